"""Shared pytest fixtures of speechbrain-meta."""

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One CPU thread, in the tests and in the train.py they start.

    The test models are too small to gain from a second thread, and on a busy
    2-core machine two spinning OpenMP threads cost many times the CPU time of
    one (a debug run took 10 s on one thread, 70-200 s on two).
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Data: Debian package cache, embedded corpus, Czech recordings -------------


@pytest.fixture(scope="session")
def download_folder() -> str:
    """Cache of the Debian packages the recipes fetch, kept between test runs.

    It is ``data/downloads`` in the repository (git-ignored), so that only the
    first run downloads (about 115 MB, mostly Fish Fillets NG).
    """
    folder = REPO_ROOT / "data" / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, download_folder) -> dict:
    """The ``tiny`` embedded corpus (12 languages, 12 utterances each).

    Returns a dict with ``data_folder`` (to replace ``$data_root``),
    ``save_folder``, the manifest paths ``train``, ``dev`` and ``test``, and the
    ``languages`` and held-out ``targets``.
    """
    from recipes.embedded_corpus.config import load_config
    from recipes.embedded_corpus.prepare import prepare_embedded_corpus

    data_folder = str(tmp_path_factory.mktemp("tiny_corpus"))
    manifests = prepare_embedded_corpus(
        data_folder, size="tiny", download_folder=download_folder
    )
    config = load_config()
    return {
        "data_folder": data_folder,
        "save_folder": data_folder,
        **manifests,
        "languages": config["languages"],
        "targets": config["targets"],
    }


@pytest.fixture(scope="session")
def fillets_cs_corpus(tmp_path_factory, download_folder) -> dict:
    """40 Czech Fish Fillets NG recordings (real speech), split like the full set.

    Returns a dict with ``data_folder``, ``save_folder`` and the manifest paths
    ``train``, ``dev`` and ``test``.
    """
    from recipes.fillets_cs.prepare import prepare_fillets_cs

    data_folder = str(tmp_path_factory.mktemp("fillets_cs"))
    manifests = prepare_fillets_cs(
        data_folder, max_clips=40, download_folder=download_folder
    )
    return {"data_folder": data_folder, "save_folder": data_folder, **manifests}


@pytest.fixture(scope="session")
def load_manifest():
    """A function ``load(path, data_folder) -> rows`` that also checks the audio.

    It parses the manifest with SpeechBrain (``$data_root`` replaced), checks
    its columns, and checks that every wav exists, is 16 kHz mono 16-bit,
    is not silent and lasts the listed duration. It returns the CSV rows.
    """
    from speechbrain.dataio.dataset import DynamicItemDataset

    def load(path: str, data_folder: str) -> list[dict]:
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            rows = list(reader)
        assert reader.fieldnames == ["ID", "duration", "wav", "spk_id", "lang", "wrd"]
        dataset = DynamicItemDataset.from_csv(
            path, replacements={"data_root": data_folder}
        )
        assert len(dataset) == len(rows) > 0
        for row in rows:
            item = dataset.data[row["ID"]]
            assert item["wav"] == row["wav"].replace("$data_root", data_folder)
            info = soundfile.info(item["wav"])
            assert (info.samplerate, info.channels, info.subtype) == (
                16000,
                1,
                "PCM_16",
            )
            assert abs(info.frames / 16000 - float(row["duration"])) < 1e-3
            audio, _ = soundfile.read(item["wav"])
            assert np.abs(audio).max() > 0.05, f"{row['ID']} is silent"
            assert row["wrd"].strip()
        return rows

    return load
