r"""Tiny randomly initialised self-supervised encoders, saved for offline use.

:func:`build_tiny_ssl` writes a wav2vec2, HuBERT or WavLM model of two
Transformer layers (hidden size 32) in the Hugging Face folder format
(``config.json``, ``model.safetensors`` and a ``preprocessor_config.json``
beside them), which ``speechbrain.integrations.huggingface.wav2vec2.Wav2Vec2``
loads with ``source`` set to the folder, the hub never contacted. Its shapes
follow XLS-R's (convolutional feature encoder with layer normalisation, 320
samples a frame: 50 frames a second at 16 kHz; pre-norm Transformer layers;
a weight-normalised positional convolution), scaled down, with no dropout and
no LayerDrop so that a meta-step is deterministic. It stands in for a
pretrained encoder in the tests, the benchmark and the ``--debug`` runs of
the ``hparams/*_ssl_ctc.yaml`` files::

    python -m speechbrain_meta.tiny_ssl --out data/tiny_ssl/wav2vec2
    python train.py hparams/maml_lora_ssl_ctc.yaml --debug \
        --ssl_source data/tiny_ssl/wav2vec2

It needs the ``ssl`` extra (``pip install speechbrain-meta[ssl]``:
``transformers``).

Example
-------
>>> import os, tempfile
>>> folder = build_tiny_ssl("hubert", os.path.join(tempfile.mkdtemp(), "hubert"))
>>> sorted(os.listdir(folder))
['config.json', 'model.safetensors', 'preprocessor_config.json']
"""

import argparse
import json
import os
from typing import Dict, List, Optional

import torch

__all__ = ["FAMILIES", "build_tiny_ssl", "tiny_config", "tiny_ssl_folder"]

#: The encoder families and their ``transformers`` configuration classes.
FAMILIES: Dict[str, str] = {
    "wav2vec2": "Wav2Vec2Config",
    "hubert": "HubertConfig",
    "wavlm": "WavLMConfig",
}

# XLS-R's layout, scaled down: 3 convolutions (XLS-R: 7) with the same total
# stride of 320 samples, so the CTC head sees 50 frames a second as it would.
_TINY_SHAPES = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (32, 32, 32),
    "conv_stride": (5, 8, 8),
    "conv_kernel": (10, 8, 8),
    "conv_bias": True,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
}
_NO_DROPOUT = {
    name: 0.0
    for name in (
        "hidden_dropout",
        "activation_dropout",
        "attention_dropout",
        "feat_proj_dropout",
        "final_dropout",
        "layerdrop",
    )
}


def tiny_config(family: str, **overrides):
    """The ``transformers`` configuration of a tiny encoder of ``family``.

    Arguments
    ---------
    family : str
        ``wav2vec2``, ``hubert`` or ``wavlm``.
    **overrides
        Configuration fields to change (e.g. ``num_hidden_layers=4``).

    Returns
    -------
    transformers.PretrainedConfig
        The configuration.

    Raises
    ------
    ValueError
        For an unknown family.

    Example
    -------
    >>> config = tiny_config("wav2vec2", hidden_size=64)
    >>> config.model_type, config.hidden_size, config.num_hidden_layers
    ('wav2vec2', 64, 2)
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, not {family!r}.")
    import transformers

    config_class = getattr(transformers, FAMILIES[family])
    return config_class(**{**_TINY_SHAPES, **_NO_DROPOUT, **overrides})


def build_tiny_ssl(family: str, out: str, seed: int = 0, **overrides) -> str:
    """Save a randomly initialised tiny encoder in the Hugging Face format.

    Arguments
    ---------
    family : str
        ``wav2vec2``, ``hubert`` or ``wavlm``.
    out : str
        The folder to write (created; files of the same names are replaced).
    seed : int
        Seed of the random weights (the same seed gives the same model).
    **overrides
        Configuration fields to change (:func:`tiny_config`).

    Returns
    -------
    str
        ``out``, for ``source`` of SpeechBrain's wrapper.
    """
    import transformers

    config = tiny_config(family, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModel.from_config(config)
    model.save_pretrained(out)
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(out)
    return out


def tiny_ssl_folder(family: str, out: str) -> str:
    """``out`` holding a tiny encoder of ``family``, built if it is missing.

    Arguments
    ---------
    family : str
        ``wav2vec2``, ``hubert`` or ``wavlm``.
    out : str
        The folder.

    Returns
    -------
    str
        ``out``.

    Example
    -------
    >>> import os, tempfile
    >>> folder = os.path.join(tempfile.mkdtemp(), "w2v")
    >>> tiny_ssl_folder("wav2vec2", folder) == tiny_ssl_folder("wav2vec2", folder)
    True
    """
    if not os.path.isfile(os.path.join(out, "config.json")):
        build_tiny_ssl(family, out)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    """Command line: ``python -m speechbrain_meta.tiny_ssl --family F --out DIR``.

    ``--config num_hidden_layers=6 hidden_size=64`` changes configuration
    fields (values read as JSON where they parse, else as strings).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="wav2vec2")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--config", nargs="*", default=[], metavar="KEY=VALUE", help="fields to change"
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.config:
        key, equals, value = item.partition("=")
        if not equals:
            parser.error(f"--config {item!r} is not KEY=VALUE.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    print(build_tiny_ssl(args.family, args.out, seed=args.seed, **overrides))


if __name__ == "__main__":
    main()
