"""Finetuning of the region CLIP with the contextual shift (SPEC §4); imported by nothing in inference."""
