"""Slide quality control: µm/px from nuclear sizes, marker ink, out-of-focus tiles."""
