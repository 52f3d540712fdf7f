"""Every bad number, config file and corpus ends in one line naming it (issue 15, item 7).

Config values are checked in-process through `load_config` + `validate`; a few cases run the
real command line to show the whole path: exit status 2, one `plait: error:` line, no
traceback. Data cases cover non-text corpora, encodings (and their caches), tokenizer
sidecars, token ids past the vocabulary and private, link-free cache folders.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from plait import config as config_mod
from plait.config import DataConfig, load_config, validate
from plait.data import load_data
from plait.data.tokenfile import write_token_file
from plait.data.tokenizer import ByteTokenizer
from plait.errors import ConfigError, DataError
from scenarios import BASE, train_cli

pytestmark = pytest.mark.timeout(300)

# French with accents: every é is one byte in Latin-1 and an invalid sequence in UTF-8.
FRENCH = "Les hommes ont oublié cette vérité, dit le renard. Mais tu ne dois pas l'oublier.\n"


def _config_error(overrides: list[str], world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny", overrides), world_size=world_size)
    message = str(err.value)
    assert "\n" not in message
    return message


def _data_error(call: typing.Callable[[], object]) -> str:
    with pytest.raises(DataError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


def _numeric_fields() -> dict[str, type]:
    """Every int, float or tuple-of-floats field, as `section.key` -> its type."""
    found = {}
    sections = typing.get_type_hints(config_mod.Config)  # SECTIONS holds the annotations as strings
    for section_name in config_mod.SECTIONS:
        for name, hint in typing.get_type_hints(sections[section_name]).items():
            if hint in (int, float) or typing.get_origin(hint) is tuple:
                found[f"{section_name}.{name}"] = hint
    return found


# ---- numbers -------------------------------------------------------------------------------


def test_every_numeric_field_has_a_range_and_every_range_a_field():
    # A new numeric setting must say which values it takes (NOT_NEGATIVE when 0 means auto/off).
    assert set(config_mod.RANGES) == set(_numeric_fields())


@pytest.mark.parametrize("field", sorted(k for k, t in _numeric_fields().items() if t is not int))
@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
def test_every_float_field_refuses_non_finite_values(field, literal):
    value = f"[{literal}, {literal}]" if field == "optim.betas" else literal
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"{field}={value}"])
    assert str(err.value).startswith(f"{field}=") and str(err.value).endswith("must be a finite number")


def test_non_finite_values_in_a_config_built_in_code_are_refused():
    cfg = load_config("tiny")
    cfg.optim.lr = math.nan  # skips the coercion of --set and TOML values
    with pytest.raises(ConfigError, match=r"^optim\.lr=nan must be a finite number$"):
        validate(cfg, world_size=1)


def test_a_toml_nan_is_refused(tmp_path):
    path = tmp_path / "nan.toml"
    path.write_text("[optim]\nlr = nan\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr=nan must be a finite number$"):
        load_config(str(path))


@pytest.mark.parametrize("override, message", [
    ("optim.eps=-1", "optim.eps=-1.0 must be > 0"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("optim.lr=-0.1", "optim.lr=-0.1 must be > 0"),
    ("optim.min_lr=-1e-4", "optim.min_lr=-0.0001 must not be negative"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must not be negative"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must not be negative"),
    ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0] must lie in [0, 1)"),
    ("optim.betas=[-0.1, 0.9]", "optim.betas=[-0.1, 0.9] must lie in [0, 1)"),
    ("optim.momentum=1", "optim.momentum=1.0 must lie in [0, 1)"),  # checked whatever optim.name is
    ("optim.scale=0", "optim.scale=0.0 must be > 0"),
    ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
    ("model.norm_eps=-1e-5", "model.norm_eps=-1e-05 must be > 0"),
    ("model.dim=0", "model.dim=0 must be at least 1"),
    ("model.top_k=0", "model.top_k=0 must be at least 1"),
    ("model.capacity_factor=-1", "model.capacity_factor=-1.0 must not be negative"),
    ("parallel.timeout_s=0", "parallel.timeout_s=0.0 must be > 0 and at most a year (31536000 s)"),
    ("parallel.timeout_s=1e12", "parallel.timeout_s=1000000000000.0 must be > 0 and at most a year"),
    ("parallel.bucket_mb=0", "parallel.bucket_mb=0.0 must be > 0"),
    ("parallel.pp_virtual_stages=0", "parallel.pp_virtual_stages=0 must be at least 1"),
    ("parallel.dp=-1", "parallel.dp=-1 must not be negative"),
    ("train.seed=-1", "train.seed=-1 must not be negative"),
    ("train.steps=18446744073709551616", "train.steps=18446744073709551616 does not fit in 64 bits"),
    ("train.lbl_coef=-0.5", "train.lbl_coef=-0.5 must not be negative"),
    ("sync.outer_lr=0", "sync.outer_lr=0.0 must be > 0"),
    ("sync.outer_momentum=1.5", "sync.outer_momentum=1.5 must lie in [0, 1)"),
    ("compression.min_compression=0", "compression.min_compression=0.0 must be > 0"),
    ("data.val_fraction=0", "data.val_fraction=0.0 must lie strictly between 0 and 1"),
    ("resilience.heartbeat_s=0", "resilience.heartbeat_s=0.0 must be > 0 and at most a year"),
    ("resilience.hang_s=-1", "resilience.hang_s=-1.0 must lie between 0 and a year"),
    ("resilience.slow_min_fraction=1", "resilience.slow_min_fraction=1.0 must lie in [0, 1)"),
])
def test_out_of_range_values_name_the_field(override, message):
    assert _config_error([override]).startswith(message)


def test_zero_is_accepted_where_it_means_auto_or_off():
    cfg = validate(load_config("tiny", [
        "parallel.dp=0", "train.micro_batch=0", "parallel.pp_microbatches=0", "model.moe_ffn_dim=0",
        "model.capacity_factor=0", "optim.grad_clip=0", "optim.weight_decay=0", "optim.min_lr=0",
        "train.eval_every=0", "train.threads=0", "train.sample_tokens=0", "checkpoint.every=0",
        "resilience.hang_s=0", "resilience.grow_wait_s=0", "resilience.snapshot_every=0", "train.seed=0",
    ]), world_size=2)
    assert (cfg.parallel.dp, cfg.train.micro_batch) == (2, 8)


# ---- config files and encodings -------------------------------------------------------------


def test_a_config_file_that_is_not_utf8_or_not_toml_is_named(tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes("# réglages\n[optim]\nlr = 1e-3\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(str(latin))
    assert str(err.value) == f"config file '{latin}' is not UTF-8 text (byte 0xe9 at offset 3), as TOML must be"
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\nlr = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(broken))
    assert str(err.value).startswith(f"config file '{broken}' is not valid TOML: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["no-such-codec", "rot13", "base64", "undefined"])
def test_data_encoding_must_be_a_text_codec(name):
    assert _config_error([f"data.encoding={name}"]) == (
        f"data.encoding={name!r} is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252, utf-16)"
    )


def test_known_encodings_are_accepted():
    for name in ("utf-8", "latin-1", "latin1", "cp1252", "utf-16", "koi8-r"):
        validate(load_config("tiny", [f"data.encoding={name}"]), world_size=1)


# ---- corpora that are not UTF-8 text -------------------------------------------------------


def _latin1_corpus(tmp_path: Path, copies: int = 60) -> Path:
    path = tmp_path / "french.txt"
    path.write_bytes((FRENCH * copies).encode("latin-1"))
    return path


def test_latin1_needs_data_encoding_and_then_reads_without_replacement(tmp_path):
    corpus = _latin1_corpus(tmp_path)
    message = _data_error(lambda: load_data(DataConfig(corpus=str(corpus)), 256, 16))
    assert message == (
        f"data.corpus: '{corpus}' is not valid utf-8 text (byte 0xe9 at offset 20); if it is text in "
        "another encoding, set data.encoding (plait prepare: --encoding) to it, e.g. data.encoding=latin-1"
    )
    data = load_data(DataConfig(corpus=str(corpus), encoding="latin-1"), 256, 16)
    text = ByteTokenizer().decode(np.concatenate([data.train, data.val]).tolist())
    assert text == FRENCH * 60 and "\ufffd" not in text


def test_another_encoding_is_another_cache(tmp_path):
    # Byte 0x80 is a C1 control in Latin-1 and the euro sign in cp1252: the two texts differ.
    corpus = tmp_path / "euro.txt"
    corpus.write_bytes(b"price: 5 \x80 per line\n" * 200)
    cache = tmp_path / "cache"
    latin = load_data(DataConfig(corpus=str(corpus), encoding="latin-1", cache_dir=str(cache)), 256, 16)
    cp1252 = load_data(DataConfig(corpus=str(corpus), encoding="cp1252", cache_dir=str(cache)), 256, 16)
    assert "€" in ByteTokenizer().decode(cp1252.train[:40].tolist())
    assert "€" not in ByteTokenizer().decode(latin.train[:40].tolist())
    # The default must still refuse the file: no cache made under another encoding answers for it.
    assert "is not valid utf-8 text" in _data_error(
        lambda: load_data(DataConfig(corpus=str(corpus), cache_dir=str(cache)), 256, 16))
    assert len(list(cache.glob("text-*.json"))) == 2 and len(list(cache.glob("*.bin"))) == 2


def test_a_binary_file_is_not_text_in_any_encoding(tmp_path):
    blob = tmp_path / "random.dat"
    blob.write_bytes(np.random.default_rng(0).bytes(8192))
    for encoding in ("utf-8", "latin-1"):
        message = _data_error(lambda: load_data(DataConfig(corpus=str(blob), encoding=encoding), 256, 16))
        assert message == f"data.corpus: '{blob}' is not text (it contains NUL bytes)"
    # Without NUL bytes, its control characters give it away.
    no_nul = tmp_path / "random-no-nul.dat"
    no_nul.write_bytes(bytes(b for b in np.random.default_rng(1).bytes(8192) if b))
    message = _data_error(lambda: load_data(DataConfig(corpus=str(no_nul), encoding="latin-1"), 256, 16))
    assert message.startswith(f"data.corpus: '{no_nul}' is not text (") and "control characters" in message


def test_mostly_undecodable_bytes_are_not_text(tmp_path):
    high = tmp_path / "high.dat"
    high.write_bytes(bytes(0x80 + b % 0x80 for b in np.random.default_rng(2).bytes(8192)))
    message = _data_error(lambda: load_data(DataConfig(corpus=str(high)), 256, 16))
    assert message.startswith(f"data.corpus: '{high}' is not text: ")
    assert message.endswith("of it is not valid utf-8 (if it is text in another encoding, set data.encoding (plait prepare: --encoding) to it)")


def test_a_folder_skips_binary_files_but_names_a_misencoded_one(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("plain ascii\n" * 50)
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (root / "sub" / "french.txt").write_bytes(FRENCH.encode("latin-1"))
    message = _data_error(lambda: load_data(DataConfig(corpus=str(root)), 256, 16))
    assert message.startswith(f"data.corpus: '{root}' holds 'sub/french.txt', which is not valid utf-8 text")
    data = load_data(DataConfig(corpus=str(root), encoding="latin-1"), 256, 16)
    text = ByteTokenizer().decode(np.concatenate([data.train, data.val]).tolist())
    assert text == "plain ascii\n" * 50 + "\n\n" + FRENCH  # the PNG is skipped


# ---- token files ---------------------------------------------------------------------------


def _token_file(tmp_path: Path, ids: np.ndarray, name: str = "tokens.bin") -> Path:
    out = tmp_path / name
    write_token_file(out, ids, val_start=len(ids) - len(ids) // 10, tokenizer=ByteTokenizer(),
                     source={"corpus": "test"})
    return out


def test_an_unknown_tokenizer_in_a_sidecar_is_one_line(tmp_path):
    out = _token_file(tmp_path, np.arange(4000) % 256)
    sidecar = out.with_name(out.name + ".json")
    meta = json.loads(sidecar.read_text())
    meta["tokenizer"] = {"type": "wordpiece"}
    sidecar.write_text(json.dumps(meta))
    assert _data_error(lambda: load_data(DataConfig(corpus=str(out)), 256, 16)) == (
        f"data.corpus: '{out}' has a sidecar 'tokens.bin.json' whose tokenizer type 'wordpiece' is unknown "
        "(plait knows byte and bpe); re-run plait prepare"
    )
    meta["tokenizer"] = {"type": "bpe", "tokenizers": {"model": "garbage"}}
    sidecar.write_text(json.dumps(meta))
    message = _data_error(lambda: load_data(DataConfig(corpus=str(out)), 256, 16))
    assert message.startswith(f"data.corpus: '{out}' has a sidecar 'tokens.bin.json' whose bpe tokenizer does not load")


def test_token_ids_past_the_vocabulary_are_refused(tmp_path):
    ids = np.arange(4000) % 256
    ids[1234] = 300
    out = _token_file(tmp_path, ids)
    assert _data_error(lambda: load_data(DataConfig(corpus=str(out)), 256, 16)) == (
        f"data.corpus: '{out}' holds token id 300, but model.vocab_size=256 allows ids below 256; "
        "raise model.vocab_size or re-run plait prepare"
    )
    assert load_data(DataConfig(corpus=str(out)), 301, 16).train[1234] == 300


# ---- cache folders -------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_cache_folders_are_created_owner_only_and_never_beside_the_input(tmp_path, monkeypatch):
    corpus = _latin1_corpus(tmp_path)
    root = tmp_path / "deep" / "cache"
    load_data(DataConfig(corpus=str(corpus), encoding="latin-1", cache_dir=str(root)), 256, 16)
    assert _mode(root) == 0o700 and list(root.glob("*.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "french.txt"]  # nothing beside the input
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "env-cache"))
    load_data(DataConfig(corpus=str(corpus), encoding="latin-1"), 256, 16)
    assert _mode(tmp_path / "env-cache") == 0o700 and list((tmp_path / "env-cache").glob("*.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "env-cache", "french.txt"]


def test_a_symlinked_cache_folder_is_refused_and_not_written_through(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir()
    # The global cache: a link somebody else planted is refused (as root the test can make one) ...
    link = tmp_path / "cache-link"
    link.symlink_to(target)
    if os.getuid() == 0:
        os.lchown(link, 65534, 65534)
        monkeypatch.setenv("PLAIT_CACHE", str(link))
        message = _data_error(lambda: load_data(DataConfig(), 256, 16))  # shakespeare: always the global cache
        assert message.startswith(f"cache folder '{link}' is a symbolic link")
        dangling = tmp_path / "dangling"
        dangling.symlink_to(tmp_path / "nowhere")
        os.lchown(dangling, 65534, 65534)
        message = _data_error(lambda: load_data(DataConfig(cache_dir=str(dangling)), 256, 16))
        assert message.startswith(f"cache folder '{dangling}' is a symbolic link")
        assert list(target.iterdir()) == [] and not (tmp_path / "nowhere").exists()
    # ... while the user's own link (a cache moved to a bigger disk) is followed.
    mine = tmp_path / "my-cache-link"
    mine.symlink_to(target)
    load_data(DataConfig(cache_dir=str(mine)), 256, 16)
    assert list(target.iterdir())


# ---- the command line ----------------------------------------------------------------------


def _train_with_config(run_dir: Path, config: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "plait", "train", str(config), "--nproc", "1", "--run-dir", str(run_dir)]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Each bad input through `plait train --nproc 1`, two at a time: (result, what its line must name)."""
    root = tmp_path_factory.mktemp("validation-cli")
    latin = _latin1_corpus(root)
    blob = root / "random.dat"
    blob.write_bytes(np.random.default_rng(0).bytes(8192))
    ids = np.arange(4000) % 256
    ids[7] = 999
    too_big = _token_file(root, ids, "too-big.bin")
    bad_toml = root / "latin.toml"
    bad_toml.write_bytes("# réglages\n[optim]\nlr = 1e-3\n".encode("latin-1"))
    short = BASE + ["train.steps=1"]
    jobs = {
        "optim.lr=nan": (lambda run: train_cli(run, short + ["optim.lr=nan"], nproc=1), "optim.lr=nan"),
        "timeout_s=nan": (lambda run: train_cli(run, short + ["parallel.timeout_s=nan"], nproc=1),
                          "parallel.timeout_s=nan"),
        "optim.eps=-1": (lambda run: train_cli(run, short + ["optim.eps=-1"], nproc=1), "optim.eps=-1.0"),
        "non-utf8 toml": (lambda run: _train_with_config(run, bad_toml), str(bad_toml)),
        "latin-1 corpus": (lambda run: train_cli(run, short + [f"data.corpus={latin}"], nproc=1), "data.encoding"),
        "binary corpus": (lambda run: train_cli(run, short + [f"data.corpus={blob}"], nproc=1), "is not text"),
        "ids past vocab": (lambda run: train_cli(run, short + [f"data.corpus={too_big}"], nproc=1),
                           "holds token id 999"),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, root / name.replace(" ", "-")) for name, (run, _) in jobs.items()}
        return {name: (futures[name].result(), jobs[name][1]) for name in jobs}


@pytest.mark.parametrize("case", ["optim.lr=nan", "timeout_s=nan", "optim.eps=-1", "non-utf8 toml",
                                  "latin-1 corpus", "binary corpus", "ids past vocab"])
def test_the_command_line_says_one_line_and_exits_2(cli_results, case):
    result, named = cli_results[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("plait: error: ") and named in lines[0], result.stderr


def test_latin1_trains_with_data_encoding(tmp_path):
    corpus = _latin1_corpus(tmp_path, copies=100)
    result = train_cli(tmp_path / "run", BASE + ["train.steps=1", f"data.corpus={corpus}", "data.encoding=latin-1"],
                       nproc=1)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
