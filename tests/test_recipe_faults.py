"""A new user's mistakes through train.py: stopped with a clear error before
training, or skipped and counted; their files never touched; reruns safe."""

import csv
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import train
from speechbrain_meta.asr import ASR
from speechbrain_meta.errors import SetupError
from speechbrain_meta.run_lock import LOCK_NAME, output_folder_lock

REPO = Path(__file__).resolve().parents[1]
MAML = str(REPO / "hparams" / "maml_ctc.yaml")
FOMAML = str(REPO / "hparams" / "fomaml_ctc.yaml")
# The tiny corpus has 8 train and 2 dev/test utterances per language.
TINY = [
    "--support_size", "3", "--query_size", "3",
    "--eval_support_size", "1", "--eval_query_size", "1",
]  # fmt: skip


def user_corpus(tiny_corpus, folder: Path, edit=None) -> Path:
    """The tiny corpus as a user's own manifests (absolute wav paths).

    ``edit(split, rows)`` may change the rows before they are written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        with open(tiny_corpus[split], encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        for row in rows:
            row["wav"] = row["wav"].replace("$data_root", tiny_corpus["data_folder"])
        if edit is not None:
            edit(split, rows)
        with open(folder / f"{split}.csv", "w", encoding="utf-8", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return folder


def tree_digest(folder: Path) -> dict:
    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def argv(yaml, data: Path, out: Path, *options) -> list:
    """train.py's command line on the tiny corpus; ``options`` win over TINY."""
    flags = [option for option in options if option == "--debug"]
    pairs = [option for option in options if option != "--debug"]
    overrides = dict(zip(TINY[::2], TINY[1::2]))
    overrides.update(zip(pairs[::2], pairs[1::2]))
    return [
        yaml, "--data_folder", str(data), "--skip_prep", "True",
        "--output_folder", str(out), "--noprogressbar", *flags,
        *(arg for pair in overrides.items() for arg in pair),
    ]  # fmt: skip


def run_cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- user data
def test_forgetting_skip_prep_stops_in_one_line_and_touches_nothing(
    tiny_corpus, tmp_path
):
    data = user_corpus(tiny_corpus, tmp_path / "my_corpus")
    before = tree_digest(data)
    result = run_cli(MAML, "--data_folder", data, "--output_folder", tmp_path / "out")
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]  # after SpeechBrain's log
    assert line.startswith("error: ") and "--skip_prep True" in line
    assert str(data) in line and "Traceback" not in result.stderr
    assert tree_digest(data) == before


def test_manifest_problems_are_all_reported_before_training(tiny_corpus, tmp_path):
    def break_rows(split, rows):
        if split == "train":
            rows[0]["wrd"] = ""
            rows[1]["duration"] = "two"
            rows[2]["wav"] = "/no/such/file.wav"
        if split == "test":
            rows[0]["wrd"] = "   "

    data = user_corpus(tiny_corpus, tmp_path / "data", break_rows)
    before = tree_digest(data)
    result = run_cli(*argv(MAML, data, tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{data / 'train.csv'}:2:" in result.stderr  # line 2: first row
    for reason in ("empty transcript", "duration", "/no/such/file.wav"):
        assert reason in result.stderr
    assert f"{data / 'test.csv'}:2:" in result.stderr
    assert "--skip_bad_rows True" in result.stderr
    assert not list((tmp_path / "out").glob("save/CKPT*"))
    assert tree_digest(data) == before


def test_skip_bad_rows_trains_without_them(tiny_corpus, tmp_path):
    def break_rows(split, rows):
        if split == "train":
            rows[0]["wrd"] = ""
            rows[1]["duration"] = "two"

    data = user_corpus(tiny_corpus, tmp_path / "data", break_rows)
    out = tmp_path / "out"
    result = run_cli(*argv(FOMAML, data, out, "--debug", "--skip_bad_rows", "True"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping 2 of" in (out / "log.txt").read_text()
    assert (out / "cer.txt").is_file()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--task_key", "accent"], r"accent.*'ID', 'duration', 'wav', 'spk_id'"),
        (["--source_tasks", "[en, de, xx]"], r"\['xx'\] are not 'lang' values"),
        (["--inner_lr", "-0.1"], "inner_lr must be a finite learning rate > 0"),
        (["--inner_steps", "0"], "inner_steps must be a whole number >= 1"),
        (["--max_grad_norm", "-1"], "max_grad_norm must be > 0"),
        (["--brain_class", "!name:speechbrain.Brain"], "brain_class must be"),
        (["--support_size", "6"], "drop_small_tasks: True"),
        (["--optimizer", "sgd"], "read it as its run option --optimizer_step_limit"),
    ],
    ids=["task_key", "source_tasks", "inner_lr", "inner_steps", "max_grad_norm",
         "brain_class", "small_tasks", "abbreviated_run_option"],
)  # fmt: skip
def test_bad_configuration_is_a_setup_error_naming_it(
    tiny_corpus, tmp_path, options, expected
):
    data = user_corpus(tiny_corpus, tmp_path / "data")
    with pytest.raises(SetupError) as error:
        train.main(argv(MAML, data, tmp_path / "out", *options))
    assert re.search(expected, str(error.value), flags=re.DOTALL), error.value


def test_fomaml_with_first_order_false_is_refused_on_the_command_line(
    tiny_corpus, tmp_path
):
    data = user_corpus(tiny_corpus, tmp_path / "data")
    result = run_cli(*argv(FOMAML, data, tmp_path / "out", "--first_order", "False"))
    assert result.returncode == 2
    assert "error: FOMAML is first-order MAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_drop_small_tasks_is_settable(tiny_corpus, tmp_path):
    """The option the sampler's error names is a YAML key and an override."""
    data = user_corpus(tiny_corpus, tmp_path / "data")
    options = ["--support_size", "6", "--drop_small_tasks", "True"]
    with pytest.raises(SetupError, match="after dropping small tasks"):
        train.main(argv(MAML, data, tmp_path / "out", *options))


def nan_wav(path: Path, frames: int = 16000) -> None:
    samples = np.full(frames, 0.1, dtype=np.float32)
    samples[100:200] = np.nan
    soundfile.write(path, samples, 16000, subtype="FLOAT")


def test_nonfinite_audio_is_skipped_and_counted_never_trained_on(tiny_corpus, tmp_path):
    broken = tmp_path / "broken.wav"
    nan_wav(broken)

    def use_broken_audio(split, rows):
        if split == "train":
            for row in rows:
                if row["lang"] == "de":
                    row["wav"] = str(broken)

    data = user_corpus(tiny_corpus, tmp_path / "data", use_broken_audio)
    out = tmp_path / "out"
    result = run_cli(*argv(FOMAML, data, out, "--debug"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "skipped: its audio is non-finite samples" in log
    for paramfile in out.glob("save/CKPT+*/model.ckpt"):
        weights = torch.load(paramfile)
        assert all(torch.isfinite(t).all() for t in weights.values())


# ---------------------------------------------------------------- reruns
def source_characters(tiny_corpus, languages) -> set:
    with open(tiny_corpus["train"], encoding="utf-8") as stream:
        rows = [row for row in csv.DictReader(stream) if row["lang"] in languages]
    return {character for row in rows for character in row["wrd"]}


def encoder_labels(out: Path) -> set:
    text = (out / "save" / "label_encoder.txt").read_text()
    return set(re.findall(r"^'(.)' => \d+$", text, flags=re.MULTILINE))


SHORT = ["--number_of_epochs", "1", "--episodes_per_epoch", "2", "--eval_episodes", "2"]


def test_a_failed_runs_label_encoder_is_rebuilt_for_other_sources(
    tiny_corpus, tmp_path
):
    out = tmp_path / "out"
    data = Path(tiny_corpus["data_folder"])
    with pytest.raises(SetupError):  # fails after the encoder was written
        train.main(
            argv(MAML, data, out, "--source_tasks", "[en, de]",
                 "--eval_query_size", "5")
        )  # fmt: skip
    assert encoder_labels(out) == source_characters(tiny_corpus, ["en", "de"])
    train.main(
        argv(MAML, data, out, "--source_tasks", "[ru, bg]", "--tasks_per_batch", "2",
             *SHORT)
    )  # fmt: skip
    assert encoder_labels(out) == source_characters(tiny_corpus, ["ru", "bg"])


def test_other_sources_into_a_run_with_checkpoints_are_refused(tiny_corpus, tmp_path):
    out = tmp_path / "out"
    data = Path(tiny_corpus["data_folder"])
    options = ["--tasks_per_batch", "2", *SHORT]
    train.main(argv(FOMAML, data, out, "--source_tasks", "[en, de]", *options))
    assert list(out.glob("save/CKPT+*"))
    with pytest.raises(SetupError, match="another --output_folder"):
        train.main(argv(FOMAML, data, out, "--source_tasks", "[ru, bg]", *options))
    train.main(argv(FOMAML, data, out, "--source_tasks", "[en, de]", *options))


def test_a_second_run_into_a_folder_in_use_stops_at_once(tiny_corpus, tmp_path):
    out = tmp_path / "out"
    data = user_corpus(tiny_corpus, tmp_path / "data")
    running = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"),
         *argv(FOMAML, data, out, "--number_of_epochs", "50")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        lock = out / LOCK_NAME
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        assert f"pid {running.pid}" in lock.read_text()
        start = time.time()
        result = run_cli(*argv(FOMAML, data, out, "--debug"))
        assert result.returncode == 2 and "in use by another run" in result.stderr
        assert time.time() - start < 60
    finally:
        running.kill()
        running.wait()
    with output_folder_lock(str(out)):  # a killed run leaves nothing stuck
        pass


def test_kill_9_and_rerun_ends_bit_identical_with_augmentation(tiny_corpus, tmp_path):
    """Speed perturbation and dropout on; the run is killed at a checkpoint."""
    data = Path(tiny_corpus["data_folder"])
    options = [
        "--number_of_epochs", "2", "--episodes_per_epoch", "6",
        "--tasks_per_batch", "2", "--eval_episodes", "2",
        "--ckpt_interval_steps", "1",
    ]  # fmt: skip
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run_cli(*argv(FOMAML, data, reference, *options)).returncode == 0
    command = [sys.executable, str(REPO / "train.py"), *argv(FOMAML, data, killed)]
    process = subprocess.Popen(
        [*command, *options], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        intra = [
            c for c in killed.glob("save/CKPT+*/CKPT.yaml")
            if "end-of-epoch: false" in c.read_text()
        ]  # fmt: skip
        if intra and (intra[0].parent / "counter.ckpt").exists():
            if (intra[0].parent / "counter.ckpt").read_text() == "2":
                break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "cer.txt").exists()
    assert run_cli(*argv(FOMAML, data, killed, *options)).returncode == 0

    def last_epoch_weights(folder):
        for checkpoint in folder.glob("save/CKPT+*"):
            if (
                checkpoint / "counter.ckpt"
            ).read_text() == "2" and "end-of-epoch: true" in (
                checkpoint / "CKPT.yaml"
            ).read_text():
                return torch.load(checkpoint / "model.ckpt")
        raise AssertionError(f"no end-of-epoch 2 checkpoint in {folder}")

    expected, resumed = last_epoch_weights(reference), last_epoch_weights(killed)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    assert (killed / "cer.txt").read_text() == (reference / "cer.txt").read_text()


def test_a_stage_where_no_utterance_was_scored_says_why():
    import speechbrain as sb
    from speechbrain.utils.metric_stats import ErrorRateStats

    recipe = ASR()
    recipe.cer_metric, recipe.unscored_tasks = ErrorRateStats(), 3
    with pytest.raises(RuntimeError, match="3 tasks were not scored"):
        recipe.on_stage_end(sb.Stage.VALID, float("nan"), epoch=1)
