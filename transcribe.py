#!/usr/bin/env python3
"""Transcribe audio files with a speechbrain-meta inference folder.

Reads any format, sample rate and channel count (resampled and down-mixed to
the model's), transcribes files longer than ``--max_seconds`` in pieces cut at
quiet points (docs/inference.md), shows a progress bar for several files, and
prints ``path<TAB>transcript`` lines or writes ``--output results.csv`` /
``results.json``. A folder that is not a model, or a file that is missing,
empty or unreadable, ends it with one ``error: ...`` line and exit status 2.

Example
-------
python transcribe.py results/adapt_ctc/cs/maml_2minutes/1234/inference a.wav b.flac
python transcribe.py models/cs a.wav --output results.csv --device cuda

Authors
-------
speechbrain-meta developers
"""

import argparse
import csv
import json
import sys

from tqdm import tqdm

from speechbrain_meta.audio import file_problem
from speechbrain_meta.errors import SetupError
from speechbrain_meta.experiment import run_script
from speechbrain_meta.inference import (
    add_decoding_options,
    decoding_overrides,
    load_asr,
    transcribe_long,
)


def main(argv: list) -> list:
    """Command line: ``python transcribe.py MODEL_FOLDER FILE [FILE ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an inference folder")
    parser.add_argument("files", nargs="+", help="audio files")
    parser.add_argument("--output", help="a .csv or .json file (default: stdout)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--max_seconds", type=float, default=30.0)
    add_decoding_options(parser)
    args = vars(parser.parse_args(argv))
    output = args["output"]
    if output is not None and not output.endswith((".csv", ".json")):
        raise SetupError(f"--output must end in .csv or .json, not {output}.")
    for path in args["files"]:
        problem = file_problem(path)
        if problem is not None:
            raise SetupError(f"Cannot read the audio file {path}: {problem}.")
    asr = load_asr(
        args["model"],
        overrides=decoding_overrides(args),
        run_opts={"device": args["device"]},
    )
    files = args["files"]
    rows = [
        {"path": path, "text": transcribe_long(asr, path, args["max_seconds"])}
        for path in tqdm(files, disable=len(files) < 2, unit="file")
    ]
    if output is None:
        for row in rows:
            print(f"{row['path']}\t{row['text']}")
    elif output.endswith(".csv"):
        with open(output, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, ["path", "text"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(output, "w", encoding="utf-8") as stream:
            json.dump(rows, stream, ensure_ascii=False, indent=1)
    return rows


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
