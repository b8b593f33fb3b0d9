"""speechbrain-meta: meta-learned ASR initialisations for SpeechBrain."""

__version__ = "0.1.0"
