"""Bad input on the command line: every case exits non-zero with one line on stderr
(`slms: error: ...`) and no traceback."""

import dataclasses
import errno
import io
import json
import os

import pytest
import torch

from conftest import tiny_config
from slms.checkpoint import save_checkpoint
from slms.cli import COMMANDS, main, os_error_line
from slms.infer.chat import Chat
from slms.infer.generate import Sampling, generate_text
from slms.model import GPT

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "model.moe.expert_hidden=32", "train.batch_size=4", "train.max_steps=1"]
CANNOT_EXIST = "/proc/slms-test/x"  # procfs refuses new entries, even to root


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(tiny_config(moe=True, block_size=64)).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, tokenizer):
    return save_checkpoint(tmp_path_factory.mktemp("bad") / "ckpt", model, tokenizer)


def one_line_error(argv: list[str], capsys) -> str:
    """Run `slms argv`; assert it failed with one line on stderr; return that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("slms: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# --- sampling values: one check, in Sampling ---------------------------------------------

BAD_SAMPLING = [  # (option, value, words of the message)
    ("--temperature", "-1", "temperature must be a number >= 0"),
    ("--temperature", "nan", "temperature must be a number >= 0"),
    ("--top-p", "2", "top_p must be in (0, 1]"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
    ("--top-k", "-3", "top_k must be an integer >= 0"),
    ("--repetition-penalty", "0", "repetition_penalty must be a number > 0"),
    ("--max-new-tokens", "0", "max_new_tokens must be an integer >= 1"),
    ("--seed", str(2**64), "seed must be an integer"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option,value,message", BAD_SAMPLING)
def test_bad_sampling_options_are_refused(command, option, value, message, ckpt, capsys):
    assert message in one_line_error([command, ckpt, option, value], capsys)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_max_new_tokens_must_leave_room_for_the_prompt(command, ckpt, capsys):
    err = one_line_error([command, ckpt, "--max-new-tokens", "64"], capsys)
    assert "no room for the prompt" in err and "use at most 63" in err


@pytest.mark.parametrize("option", ["--new-tokens", "--b8-new-tokens"])
def test_bench_generation_lengths_are_checked(option, capsys):
    err = one_line_error(["bench", "tiny", option, "0"], capsys)
    assert f"{option}: max_new_tokens must be an integer >= 1" in err


@pytest.mark.parametrize("setting,message", [
    ("top_p=5", "top_p must be in (0, 1]"),
    ("top_p=0", "top_p must be in (0, 1]"),
    ("top_k=-3", "top_k must be an integer >= 0"),
    ("temperature=-1", "temperature must be a number >= 0"),
    ("repetition_penalty=0", "repetition_penalty must be a number > 0"),
    ("max_tokens=0", "max_new_tokens must be an integer >= 1"),
    ("max_tokens=64", "max_new_tokens 64 leaves no room for the prompt"),
])
def test_chat_settings_refuse_bad_values_and_keep_the_old_ones(setting, message, model,
                                                               tokenizer):
    out = io.StringIO()
    chat = Chat(model, tokenizer, Sampling(max_new_tokens=6, temperature=0.5, top_p=0.9), out)
    before = chat.s
    assert chat.handle(f":settings {setting}")  # the session goes on
    assert f"error: {message}" in out.getvalue()
    assert chat.s == before


def test_chat_settings_top_p_one_is_off_not_an_error(model, tokenizer):
    chat = Chat(model, tokenizer, Sampling(max_new_tokens=6), io.StringIO())
    chat.handle(":settings top_p=1 top_k=0")
    assert chat.s.top_p == 1.0 and chat.s.top_k is None


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("temperature", float("inf")), ("top_p", 1.5), ("top_p", 0.0),
    ("top_k", -1), ("top_k", 2.5), ("repetition_penalty", 0.0), ("max_new_tokens", 0),
    ("max_new_tokens", True), ("seed", -2**63 - 1), ("seed", "1"),
])
def test_python_api_sampling_checks_its_values(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        Sampling(**{field: value})
    with pytest.raises(ValueError, match=f"^{field} must be"):
        dataclasses.replace(Sampling(), **{field: value})


def test_python_api_generation_length_against_the_context(model, tokenizer):
    with pytest.raises(ValueError, match="no room for the prompt"):
        generate_text(model, tokenizer, "The cat", Sampling(max_new_tokens=64))
    s = Sampling(max_new_tokens=3, temperature=0, top_k=0, top_p=1.0, seed=-1)
    assert isinstance(generate_text(model, tokenizer, "The cat", s), str)  # the edges are fine


# --- files that cannot be written --------------------------------------------------------

def test_prepare_out_that_cannot_exist(tokenizer, tmp_path, capsys):
    tokenizer.save(tmp_path / "tok.json")
    err = one_line_error(["prepare", "--tokenizer", tmp_path / "tok.json", "--out",
                          CANNOT_EXIST, "--train-count", "5", "--val-count", "2"], capsys)
    assert f"cannot create {CANNOT_EXIST}" in err and "tmp-" not in err


def test_train_out_that_cannot_exist(data_dir, capsys):
    err = one_line_error(["train", "tiny", f"data.path={data_dir}", *TINY, "--out",
                          CANNOT_EXIST], capsys)
    assert f"cannot create {CANNOT_EXIST}" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a directory of mode 0o500")
@pytest.mark.parametrize("command", ["prepare", "train"])
def test_out_in_a_read_only_directory(command, tokenizer, data_dir, tmp_path, capsys):
    tokenizer.save(tmp_path / "tok.json")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    out = ro / "x"
    argv = (["prepare", "--tokenizer", tmp_path / "tok.json", "--train-count", "5"]
            if command == "prepare" else ["train", "tiny", f"data.path={data_dir}", *TINY])
    try:
        err = one_line_error([*argv, "--out", out], capsys)
    finally:
        ro.chmod(0o700)
    assert f"cannot create {out}" in err and "Permission denied" in err and "tmp-" not in err


def test_disk_full_during_a_save_says_the_last_checkpoint_is_intact(tmp_path, monkeypatch,
                                                                    capsys):
    import slms.train.trainer

    out = tmp_path / "run"
    temp = out / "checkpoints" / ".step-3.tmp-k2j4l1" / "config.json"

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temp))

    monkeypatch.setattr(slms.train.trainer, "train", full)
    err = one_line_error(["train", "tiny", "--out", out], capsys)
    assert f"cannot create {out} ({out}/checkpoints/step-3: No space left on device)" in err
    assert "the last checkpoint saved is intact" in err


@pytest.mark.parametrize("error,out,line", [
    (OSError(errno.EROFS, "Read-only file system", "/ro/.x.tmp-ab12"), "/ro/x",
     "cannot create /ro/x: Read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device"), "runs/x",
     "cannot create runs/x: No space left on device; NOTE"),
    (OSError(errno.ENOENT, "No such file or directory", "/data/in.txt"), "/tmp/o",
     "/data/in.txt: No such file or directory"),
    (OSError(errno.EACCES, "Permission denied", "/a/b"), None, "/a/b: Permission denied"),
    (FileNotFoundError("tokenizer file t.json not found"), "x", "tokenizer file t.json not found"),
])
def test_os_error_line(error, out, line):
    assert os_error_line(error, out, "NOTE") == line


# --- a directory where a config file is expected -----------------------------------------

def test_train_on_a_directory(tmp_path, capsys):
    err = one_line_error(["train", tmp_path], capsys)
    assert "is a directory" in err and "TOML config file" in err


def test_train_on_a_run_directory_points_to_resume(tmp_path, capsys):
    (tmp_path / "run_config.json").write_text(json.dumps({}))
    err = one_line_error(["train", tmp_path], capsys)
    assert "is a run directory" in err and f"--resume {tmp_path}" in err


# --- every command given a missing file or directory -------------------------------------

NO = "/nonexistent/slms-x"
MISSING = {  # command -> arguments naming something that does not exist ({tmp}: a temp dir)
    "demo": [f"{NO}.toml", "--out", "{tmp}/run"],
    "corpus": ["--out", CANNOT_EXIST, "--stories", "5"],  # reads nothing: an --out that cannot be
    "tokenizer": ["--data", f"{NO}.txt", "--out", "{tmp}/tok.json"],
    "prepare": ["--tokenizer", f"{NO}.json", "--out", "{tmp}/data"],
    "train": [f"{NO}.toml"],
    "plot": [NO],
    "info": [NO],
    "generate": [NO],
    "eval": [NO],
    "bench": [NO],
    "chat": [NO],
    "experts": [NO, "--out", "{tmp}/experts"],
    "import-seed": [f"{NO}.pt", "--tokenizer", f"{NO}.json", "--out", "{tmp}/ckpt"],
    "export": [NO, "--hf", "{tmp}/hf"],
    "upcycle": [NO, "--out", "{tmp}/moe"],
    "serve": [NO, "--port", "0"],
    "tune": [NO],
    "study": [f"{NO}.toml", "--dense-steps", "2", "--out", "{tmp}/study"],
    "finetune": [NO, "--out", "{tmp}/ft"],
    "eval-instruct": [NO],
}
MORE_MISSING = [  # further inputs of some commands
    ["train", "--resume", NO],
    ["train", "tiny", f"data.path={NO}"],
    ["prepare", "--source", f"{NO}.txt", "--tokenizer", "{tok}", "--out", "{tmp}/data"],
    ["eval", "{ckpt}", "--data", NO],
    ["finetune", "{ckpt}", "--data", f"{NO}.jsonl", "--out", "{tmp}/ft"],
    ["experts", "{ckpt}", "--data", NO, "--out", "{tmp}/experts"],
    ["generate", "{tmp}"],  # a directory that is not a checkpoint
    ["import-seed", f"{NO}.pt", "--tokenizer", "{tok}", "--out", "{tmp}/ckpt"],
]


def test_every_command_has_a_missing_input_case():
    assert set(MISSING) == set(COMMANDS)


@pytest.mark.parametrize("argv", [[c, *a] for c, a in MISSING.items()] + MORE_MISSING,
                         ids=lambda a: " ".join(a))
def test_missing_input_is_one_line(argv, tmp_path, ckpt, tokenizer, capsys):
    tokenizer.save(tmp_path / "tok.json")
    where = {"tmp": tmp_path, "tok": tmp_path / "tok.json", "ckpt": ckpt}
    argv = [a.format(**where) for a in argv]
    err = one_line_error(argv, capsys)
    # the line names what is missing (or the directory that is not a checkpoint)
    named = [a.split("=")[-1] for a in argv if NO in a or CANNOT_EXIST in a] or [str(tmp_path)]
    assert any(n in err for n in named), err


@pytest.mark.slow
def test_a_full_disk_in_safetensors_is_one_line_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch, capsys, data_dir):
    """safetensors reports a full disk as its own error type ("os error 28"), not OSError: the
    checkpoint writer turns it into ENOSPC, so the CLI says it in one line; the checkpoint
    before it stays whole."""
    import hashlib

    import slms.checkpoint

    out = tmp_path / "run"
    args = ["train", "configs/tiny.toml", f"data.path={data_dir}", "model.n_layer=1",
            "train.checkpoint_every=2", "train.eval_every=100", "--out", str(out)]
    assert main([*args, "train.max_steps=2"]) == 0
    step2 = out / "checkpoints" / "step-2" / "model.safetensors"
    before = hashlib.sha256(step2.read_bytes()).hexdigest()
    real = slms.checkpoint.save_model

    def full(model, path, *a, **k):  # noqa: ANN001, ANN202
        if "step-4" in str(path):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: "
                               "StorageFull, message: \"No space left on device\" }) os error 28")
        return real(model, path, *a, **k)

    monkeypatch.setattr(slms.checkpoint, "save_model", full)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "train.max_steps=4"]) == 2
    err = capsys.readouterr().err  # the progress bar, then the error
    errors = [line for line in err.replace("\r", "\n").splitlines()
              if line.startswith("slms: error")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert "intact" in errors[0] and "Traceback" not in err
    assert hashlib.sha256(step2.read_bytes()).hexdigest() == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-4")]


def test_done_line_names_what_generate_will_load(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", "configs/tiny.toml", f"data.path={data_dir}", "model.n_layer=1",
                 "train.max_steps=2", "train.eval_every=100", "train.checkpoint_every=1",
                 "--out", str(out)]) == 0
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert "best" in done and (out / "best").is_dir()  # the last step evaluates
    from slms.commands.train import where_to_load

    (out / "best").rename(tmp_path / "elsewhere")
    assert where_to_load(out) == ("no evaluation yet, so no best/; latest checkpoint in "
                                  f"{out / 'checkpoints' / 'step-2'}")


def test_document_mask_on_data_whose_endoftext_is_not_id_0_is_one_line(tmp_path, stories,
                                                                       capsys):
    """Data prepared with a tokenizer that gives <|endoftext|> another id (an imported seed
    tokenizer appends it last) cannot train a document_mask model; without the mask it trains."""
    from tokenizers import AddedToken, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HF

    from slms.data.prepare import prepare
    from slms.tokenizer import EOT, Tokenizer

    hf = HF(models.BPE(unk_token="<|unknown|>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(stories, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|unknown|>"], show_progress=False))
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    tok = Tokenizer(hf)
    assert tok.eos_id == hf.get_vocab_size() - 1
    prepare({"train": stories[20:], "val": stories[:20]}, tok, tmp_path / "data", source="test")
    capsys.readouterr()  # prepare's progress
    argv = ["train", "configs/tiny.toml", f"data.path={tmp_path / 'data'}", *TINY]
    err = one_line_error([*argv, "model.document_mask=true", "--out", tmp_path / "masked"], capsys)
    assert f"ends stories with id {tok.eos_id}" in err and "model.document_mask=false" in err
    assert not (tmp_path / "masked").exists()
    assert main([*argv, "model.document_mask=false", "--out", str(tmp_path / "plain")]) == 0
