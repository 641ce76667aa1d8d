"""Training data: manifests and their validation, datasets and loaders, packed Zarr patch stores,
synthetic patches with a controlled signal, augmentation (HED jitter, Macenko stain transfer),
class-ratio resampling and patches cut from annotated slides."""
