"""Deployable checkpoints (winoq.checkpoint, format winoq-2): codes and scales instead of float
weights, bit-identical reload into a freshly constructed random-init model for every recipe
variant, file sizes, the older float format."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import winoq
from winoq import Recipe
from winoq.checkpoint import decode_codes, encode_codes
from winoq.formats import parse
from winoq.modules import QuantConv2d, QuantLinear
from winoq.winograd.quantized import QuantWinogradConv2d


def net(seed: int) -> nn.Sequential:
    """Winograd convs (one grouped), a stride-2 and a 1x1 direct conv, two BatchNorms, a linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(),
        nn.Conv2d(40, 40, 3, padding=1, groups=2),
        nn.Conv2d(40, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24),
        nn.Conv2d(24, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()


def trained(seed: int = 0) -> nn.Sequential:
    model = net(seed)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in model.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.copy_(torch.randn(b.num_features, generator=g))
                b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.weight.copy_(torch.randn(b.num_features, generator=g))
    return model


X = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
CALIB = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))

RECIPES = {
    "standard": Recipe(winograd_min_channels=None, winograd=4, scales="standard"),
    "learned": Recipe(winograd_min_channels=None, winograd=4, learn_steps=2),
    "tapwise": Recipe(winograd_min_channels=None, winograd=4, scales="tapwise"),
    "shared-scales": Recipe(winograd_min_channels=None, winograd=4, learn_steps=1, shared_scales=True),
    "paw-fsq": Recipe(winograd_min_channels=None, winograd=4, scales="paw-fsq"),
    "int4-F6": Recipe(winograd_min_channels=None, weights="int4", winograd=6, learn_steps=1),
    "int6": Recipe(winograd_min_channels=None, weights="int6", winograd=4, learn_steps=1),
    "fp8": Recipe(winograd_min_channels=None, weights="fp8_e4m3", activations="fp8_e4m3", winograd=4, learn_steps=1),
    "fp4-format-search": Recipe(winograd_min_channels=None, weights="fp4_e2m1", winograd=4, learn_steps=1, format_search="weight"),
    "fp4-format-search-output": Recipe(winograd_min_channels=None, weights="fp4_e2m1", winograd=4, learn_steps=1, format_search="output"),
    "per-channel": Recipe(winograd_min_channels=None, group_size=None, winograd=4, learn_steps=1),
    "tapwise-weights": Recipe(winograd_min_channels=None, winograd=4, learn_steps=1, winograd_weight_scales="tapwise"),
    "learned-rounding": Recipe(winograd_min_channels=None, winograd=4, learn_steps=1, rounding="learned", rounding_iters=5),
    "block-reconstruction": Recipe(winograd_min_channels=None, winograd=4, learn_steps=1, rounding="learned", rounding_iters=5,
                                   reconstruction="block"),
    "static-ranges": Recipe(winograd_min_channels=None, winograd=4, learn_steps=1, activation_ranges="static"),
    "skip": Recipe(winograd_min_channels=None, winograd=4, learn_steps=1, skip=("0", "9")),
    "direct": Recipe(winograd_min_channels=None, winograd=None),
    "direct-int4": Recipe(winograd_min_channels=None, weights="int4", winograd=None),
    "bn-unfolded": Recipe(winograd_min_channels=None, winograd=4, learn_steps=1, fold_batchnorm=False),
}


def quantized(recipe: Recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return winoq.quantize(trained(), recipe, calib_data=CALIB if recipe.uses_calibration_data else None,
                              progress=False)


def file_table(path) -> tuple[dict, list[str]]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["codes"]), list(f.keys())


@pytest.mark.parametrize("name", list(RECIPES))
def test_load_into_a_random_init_model_is_bit_identical(tmp_path, name):
    recipe = RECIPES[name]
    qm = quantized(recipe)
    path = tmp_path / "m.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to float weights
        winoq.save(qm, path)
    fresh = net(seed=123)  # random init: nothing of the trained weights or statistics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = winoq.load(path, fresh)
    with torch.no_grad():
        assert torch.equal(qm(X), loaded(X))
    table, keys = file_table(path)
    quant = [n for n, m in qm.named_modules() if isinstance(m, (QuantConv2d, QuantLinear, QuantWinogradConv2d))]
    assert sorted(table) == sorted(quant)  # every quantized layer is stored as codes and scales
    for layer in quant:
        assert f"{layer}.weight" not in keys and f"{layer}.learned_u" not in keys
    assert not any(".bn" in k or k.startswith(("1.", "5.")) for k in keys) or not recipe.fold_batchnorm
    # a loaded model saves to the same file content
    again = tmp_path / "again.safetensors"
    winoq.save(loaded, again)
    with safe_open(str(path), "pt") as a, safe_open(str(again), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_codes_are_narrow_integers_and_float8(tmp_path):
    for recipe, want in ((RECIPES["learned"], "int8"), (RECIPES["int4-F6"], "int4x2"),
                         (RECIPES["fp8"], "float8_e4m3fn"), (RECIPES["fp4-format-search"], "grid4x2")):
        path = tmp_path / "m.safetensors"
        winoq.save(quantized(recipe), path)
        table, _ = file_table(path)
        assert {e["encoding"] for e in table.values()} == {want}
        u = [e for e in table.values() if e["part"] == "u"]
        assert u and all(e["shape"][2:] == [recipe.winograd + 2] * 2 for e in u)  # U: (K, C/groups, n, n)


@pytest.mark.parametrize("fmt", ["int2", "int3", "int4", "int5", "int8", "int8n", "int16", "uint4", "uint8",
                                 "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fp4_e3m0"])
def test_codes_round_trip_every_grid_value(fmt):
    f = parse(fmt)
    grid = f.grid()
    q = grid[torch.randint(0, grid.numel(), (7, 5), generator=torch.Generator().manual_seed(0))]
    q = torch.cat([q.flatten(), grid])  # every value, odd count (packing pads one)
    stored, encoding = encode_codes(q.float(), f)
    assert stored.element_size() * stored.numel() <= max(1, -(-f.bits // 8)) * q.numel() or f.bits > 8
    assert torch.equal(decode_codes(stored, encoding, f, tuple(q.shape), torch.float64), q)


def test_w8a8_file_is_under_a_third_of_the_float_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, stride=2),
                          nn.Flatten(), nn.LazyLinear(64)).eval()
    model(torch.randn(1, 64, 9, 9))
    float_path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(float_path))
    sizes = {}
    for w in ("int8", "int4"):
        path = tmp_path / f"{w}.safetensors"
        winoq.save(winoq.quantize(model, Recipe(weights=w, winograd=None), progress=False), path)
        sizes[w] = path.stat().st_size / float_path.stat().st_size
    assert sizes["int8"] < 0.3 and sizes["int4"] < 0.17, sizes


def test_older_float_checkpoints_still_load(tmp_path):
    """A winoq-1 file: every float tensor of the quantized model, a recipe without fold_batchnorm."""
    recipe = Recipe(winograd=4, learn_steps=1, fold_batchnorm=False)
    qm = quantized(recipe)
    data = json.loads(recipe.to_json())
    del data["fold_batchnorm"]
    meta = {"format": "winoq-1", "recipe": json.dumps(data),
            "report": json.dumps([r.__dict__ for r in qm.winoq_report], default=str)}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in qm.state_dict().items()}, str(path), metadata=meta)
    loaded = winoq.load(path, net(seed=3))
    assert not loaded.winoq_recipe.fold_batchnorm
    with torch.no_grad():
        assert torch.equal(qm(X), loaded(X))


def test_a_newer_format_is_refused_naming_the_versions(tmp_path):
    path = tmp_path / "new.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "winoq-9", "recipe": Recipe().to_json()})
    with pytest.raises(ValueError, match="winoq-9.*winoq-2"):
        winoq.load(path, net(0))


def test_codes_for_a_layer_the_model_does_not_quantize_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    winoq.save(quantized(RECIPES["learned"]), path)
    other = net(0)
    other[3] = nn.Conv2d(40, 40, 3, padding=1, groups=4)  # same shape family, other grouping
    with pytest.raises(ValueError, match="does not match"):
        winoq.load(path, other)


def test_winograd_layers_can_keep_float_weights_instead_of_u_codes(tmp_path):
    qm = quantized(RECIPES["learned"])
    codes, floats = tmp_path / "codes.safetensors", tmp_path / "float.safetensors"
    winoq.save(qm, codes)
    winoq.save(qm, floats, winograd_weights="float")
    table, keys = file_table(floats)
    assert {e["part"] for e in table.values()} == {"weight"} and "0.weight" in keys  # Winograd layer 0 in float
    assert floats.stat().st_size < codes.stat().st_size  # F(4,3): 36 int8 codes vs 9 float32 per 3x3 weight
    with torch.no_grad():
        assert torch.equal(winoq.load(floats, net(9))(X), qm(X))
    with pytest.raises(ValueError, match="winograd_weights"):
        winoq.save(qm, floats, winograd_weights="int8")


def test_loaded_winograd_layers_run_on_the_integer_kernel_with_their_saved_u(tmp_path):
    recipe = Recipe(winograd=4, learn_steps=1, rounding="learned", rounding_iters=5, activation_zero_point=False)
    qm = quantized(recipe)
    path = tmp_path / "m.safetensors"
    winoq.save(qm, path)
    loaded = winoq.load(path, net(4))
    winoq.set_kernel(qm, "int-cpu")
    winoq.set_kernel(loaded, "int-cpu")
    with torch.no_grad():
        assert torch.equal(loaded(X), qm(X))  # both use learned_u, the saved U


def test_a_dead_clip_buffer_of_older_files_is_ignored_only_at_one(tmp_path):
    qm = quantized(RECIPES["learned"])
    path = tmp_path / "m.safetensors"
    winoq.save(qm, path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.unknown_layer_stage.clip"] = torch.ones(2)  # a buffer this winoq's layers do not have
    save_file(tensors, str(path), metadata=meta)
    with torch.no_grad():
        assert torch.equal(winoq.load(path, net(2))(X), qm(X))
    tensors["0.unknown_layer_stage.clip"] = torch.tensor([0.9, 1.0])
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="clips"):
        winoq.load(path, net(2))


def test_damaged_codes_give_one_line_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    winoq.save(quantized(RECIPES["direct-int4"]), path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    cases = [({**meta, "codes": "{not json"}, tensors, "not JSON"),
             (meta, {k: v for k, v in tensors.items() if k != "0.weight.codes"}, "lack"),
             ({**meta, "codes": json.dumps({n: {**e, "encoding": "int3x5"} for n, e in json.loads(meta["codes"]).items()})},
              tensors, "unknown code encoding")]
    for m, t, match in cases:
        save_file(t, str(bad), metadata=m)
        with pytest.raises(ValueError, match=match):
            winoq.load(bad, net(1))


def test_a_file_from_before_the_kernel_size_rule_rebuilds_its_f65_layer(tmp_path):
    """Regression: files written when every eligible conv took F(m3, r) (a 5x5 conv as F(6,5)) must
    load as saved, although today's rules keep a 5x5 conv direct (or give it F(4,5))."""
    def five(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2)).eval()

    recipe = Recipe(winograd=6, group_size=4, learn_steps=1, winograd_min_channels=None)
    old_rules = {"0": (6, "F(6,3)"), "2": (6, "F(6,5)")}  # what the pre-rule quantize chose
    qm = winoq.quantize(five(0), recipe, progress=False, _saved_tiles=old_rules)
    assert qm[2].m == 6 and qm[2].kernel_size == 5
    path = tmp_path / "old_rules.safetensors"
    winoq.save(qm, path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    data = json.loads(meta["recipe"])
    for key in ("winograd_kernels", "force_winograd", "winograd_min_channels"):
        del data[key]  # fields the file's winoq did not have
    meta["recipe"] = json.dumps(data)
    save_file(tensors, str(path), metadata=meta)
    loaded = winoq.load(path, five(7))
    assert isinstance(loaded[2], QuantWinogradConv2d) and loaded[2].m == 6
    assert [(r.name, r.detail) for r in loaded.winoq_report] == [("0", "F(6,3)"), ("2", "F(6,5)")]
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(qm(x), loaded(x))
