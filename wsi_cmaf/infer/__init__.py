"""Slide inference: ``analyze_slide`` and its pieces."""

from wsi_cmaf.infer.config import InferenceConfig
from wsi_cmaf.infer.pipeline import analyze_slide, default_output_dir
from wsi_cmaf.infer.result import SlideResult

__all__ = ["InferenceConfig", "SlideResult", "analyze_slide", "default_output_dir"]
