"""Training of the SCAN segmentation model (imported by nothing in inference)."""
