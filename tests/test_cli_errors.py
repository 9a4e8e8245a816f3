"""``winoq quantize`` / ``winoq eval`` on bad files and places: one line on stderr, exit 2,
nothing overwritten, nothing half-written left behind."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import winoq
from winoq import Recipe
from winoq.cli import main
from winoq.models import get_model


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("winoq: error:")
    return err[-1]


@pytest.fixture(scope="module")
def float_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "fm.safetensors"
    save_file({k: v.contiguous() for k, v in get_model("fmnist-resnet").state_dict().items()}, str(path))
    return path


# ----------------------------------------------------------------------------- --out
def test_out_equal_to_the_input_weights_is_refused(float_file, tmp_path, capsys):
    before = float_file.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(float_file)
    dotted = float_file.parent / "." / float_file.name
    for argv in (["--model", "fmnist-resnet", "--weights", str(float_file), "--out", str(float_file)],
                 ["--model", "fmnist-resnet", "--weights", str(float_file), "--out", str(link)],
                 ["--model", str(float_file), "--out", str(dotted)]):
        assert main(["quantize", *argv, "--no-progress"]) == 2
        line = _error_line(capsys)
        assert "overwrite the float weights" in line and "choose another --out" in line
    assert float_file.read_bytes() == before


def test_an_existing_tmp_file_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    tmp = tmp_path / "q.safetensors.tmp"
    tmp.write_bytes(b"someone else's")
    assert main(["quantize", "--model", "fmnist-resnet", "--out", str(out), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert str(tmp) in line and "already exists" in line and "remove it" in line
    assert tmp.read_bytes() == b"someone else's" and not out.exists()


def test_a_full_disk_is_one_line_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", "fmnist-resnet", "--winograd", "none", "--out", str(out), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert f"cannot write {out}" in line and "No space left" in line and "free some space" in line
    assert not out.exists() and not (tmp_path / "q.safetensors.tmp").exists()


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path, capsys, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real(p, mode, **kw))
    assert main(["quantize", "--model", "fmnist-resnet", "--out", str(tmp_path / "q.safetensors")]) == 2
    assert f"output folder {tmp_path} is not writable" in _error_line(capsys)


def test_refused_recipes_are_one_line(tmp_path, capsys):
    assert main(["quantize", "--model", "fmnist-resnet", "--weights-format", "uint8", "--winograd", "none",
                 "--out", str(tmp_path / "q.safetensors"), "--no-progress"]) == 2
    assert "unsigned" in _error_line(capsys)


# ----------------------------------------------------------------------------- truncated inputs
@pytest.mark.parametrize("how", ["weights", "model"])
def test_truncated_safetensors_input_is_one_line(how, float_file, tmp_path, capsys):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(float_file.read_bytes()[: float_file.stat().st_size // 2])
    argv = ["--model", "fmnist-resnet", "--weights", str(bad)] if how == "weights" else ["--model", str(bad)]
    assert main(["quantize", *argv, "--out", str(tmp_path / "q.safetensors")]) == 2
    line = _error_line(capsys)
    assert str(bad) in line and "truncated" in line


# ----------------------------------------------------------------------------- malformed checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "fm.safetensors"
    winoq.save(winoq.quantize(get_model("fmnist-resnet"), Recipe(winograd=None), progress=False), path)
    return path


def _edited(src, dst, edit):
    with safe_open(str(src), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _set_kernel(meta, kernel):
    recipe = json.loads(meta["recipe"])
    recipe["kernel"] = kernel
    meta["recipe"] = json.dumps(recipe)


def _edit_report(meta, change):
    report = json.loads(meta["report"])
    change(report)
    meta["report"] = json.dumps(report)


MALFORMED = {
    "recipe null": (lambda m: m.update(recipe="null"), "'recipe' must be a JSON dict"),
    "recipe missing": (lambda m: m.pop("recipe"), "no 'recipe' entry"),
    "recipe not json": (lambda m: m.update(recipe="{oops"), "not valid JSON"),
    "recipe bad field": (lambda m: _set_kernel(m, 3), "kernel must be a str"),
    "triton here": (lambda m: _set_kernel(m, "triton"), "kernel='triton', which cannot run on this machine"),
    "report unknown field": (lambda m: _edit_report(m, lambda r: r[0].update(colour="red")), "unknown fields ['colour']"),
    "report missing field": (lambda m: _edit_report(m, lambda r: r[0].pop("kind")), "missing fields ['kind']"),
    "report missing layer": (lambda m: _edit_report(m, lambda r: r.pop()), "not in the report"),
    "report unknown layer": (lambda m: _edit_report(m, lambda r: r[0].update(name="nowhere")), "nowhere"),
    "report not a list": (lambda m: m.update(report="{}"), "'report' must be a JSON list"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_metadata_is_one_line(case, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine
    edit, fragment = MALFORMED[case]
    bad = _edited(checkpoint, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ValueError, match="bad.safetensors") as err:
        winoq.load(bad, get_model("fmnist-resnet"))
    assert fragment in str(err.value)
    assert main(["eval", "--model", "fmnist-resnet", "--checkpoint", str(bad), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert f"cannot load checkpoint {bad}" in line and fragment in line


def test_the_unedited_checkpoint_still_loads(checkpoint):
    with safe_open(str(checkpoint), "pt") as f:
        saved = [r["name"] for r in json.loads(f.metadata()["report"])]
    qm = winoq.load(checkpoint, get_model("fmnist-resnet"))
    assert [r.name for r in qm.winoq_report] == saved and len(saved) > 5
