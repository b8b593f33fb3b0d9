"""Embedded multilingual corpus: Debian text sentences read by espeak-ng voices."""
