"""The training loop: checkpoints with cards, resume, determinism, phases and batches of any kind."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from napari_register import weights
from napari_register.data import HOLDOUT
from napari_register.data.pairs import PairSource
from napari_register.data.volumes import RealVolumes
from napari_register.methods.carl import build
from napari_register.training import build_parser
from napari_register.training.loop import train
from napari_register.training.recipe import Optimiser, Phase, Recipe

torch.set_num_threads(1)
TINY = '{"width": 4, "features": 8, "unet_channels": [4, 8]}'


def _args(tmp_path, steps: int, name: str = "tiny", seed: int = 0, options: str = "", method: str = "carl",
          extra: tuple[str, ...] = ()):
    opts = '{"warmup": 2, "real_fraction": 0%s}' % (", " + options if options else "")
    return build_parser().parse_args([
        "--method", method, "--dim", "2", "--out", str(tmp_path / f"{name}.pt"), "--steps", str(steps),
        "--shape", "32", "32", "--save-every", "2", "--seed", str(seed), "--threads", "1", "--config", TINY,
        "--recipe-options", opts, *extra])


def _log(tmp_path, name="tiny"):
    return [json.loads(line) for line in (tmp_path / f"{name}.run" / "log.jsonl").read_text().splitlines()]


def test_train_writes_a_loadable_checkpoint_with_its_card(tmp_path):
    path = train(_args(tmp_path, 3))
    card = json.loads(path.with_suffix(".json").read_text())
    for key in ("method", "dim", "config", "command", "data", "steps", "seed", "final_losses", "code_version",
                "sha256", "train", "recipe_options", "phases"):
        assert key in card, key
    assert card["steps"] == 3 and card["dim"] == 2 and card["method"] == "carl"
    assert card["recipe_options"]["warmup"] == 2 and card["recipe_options"]["reg"] == "gradicon"
    assert [p["name"] for p in card["phases"]] == ["warmup", "main"]
    assert set(card["final_losses"]) >= {"loss", "sim", "reg"}
    net, _ = weights.load(path, "carl", 2, build)
    assert net(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    log = _log(tmp_path)
    assert [e["step"] for e in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)


def test_resume_continues_from_the_saved_step(tmp_path):
    train(_args(tmp_path, 2))
    first = weights.load(tmp_path / "tiny.pt", "carl", 2, build)[0].state_dict()
    train(_args(tmp_path, 4))  # same run dir: picks up at step 2
    assert [e["step"] for e in _log(tmp_path)] == [1, 2, 3, 4]
    card = json.loads((tmp_path / "tiny.json").read_text())
    assert card["steps"] == 4
    after = weights.load(tmp_path / "tiny.pt", "carl", 2, build)[0].state_dict()
    assert any(not torch.equal(first[k], after[k]) for k in first)


def test_same_seed_same_weights(tmp_path):
    a = train(_args(tmp_path, 2, "a", seed=3))
    b = train(_args(tmp_path, 2, "b", seed=3))
    c = train(_args(tmp_path, 2, "c", seed=4))
    wa, wb, wc = (weights.load(p, "carl", 2, build)[0].state_dict() for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_untrainable_method_unknown_option_and_bad_json_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no network to train"):
        train(_args(tmp_path, 1, method="optimize"))
    with pytest.raises(ValueError, match="not a method"):
        train(_args(tmp_path, 1, method="nope"))
    with pytest.raises(ValueError, match=r"no option\(s\) \['lamda'\].*'lam'"):
        train(_args(tmp_path, 1, options='"lamda": 1'))
    args = _args(tmp_path, 1)
    args.recipe_options = "{warmup: 1}"
    with pytest.raises(ValueError, match="--recipe-options is not valid JSON"):
        train(args)


def test_synthetic_pairs_in_range_and_deformed():
    batch = next(iter(PairSource(3, (24, 24, 24), batch=2, real_fraction=0.0, seed=1)))
    moving, fixed = batch["moving"], batch["fixed"]
    assert moving.shape == fixed.shape == (2, 1, 24, 24, 24)
    assert 0 <= moving.min() and moving.max() <= 1
    assert (moving - fixed).abs().mean() > 0.02  # the two images differ (deformation, translation)


def test_real_volumes_exclude_every_benchmark_case():
    real = RealVolumes()
    if not len(real):
        pytest.skip("../shared/data not present (set NAPARI_REGISTER_DATA)")
    assert real.names and not any(HOLDOUT.excludes(n) for n in real.names)
    numbers = {int(n.rsplit("case", 1)[1][:6]) for n in real.names if "prostate3d" in n}
    assert numbers and not numbers & {0, 1, 2, 3, 4, 8, 9, 11, 12, 14, 17, 18}  # prostate + mr_us tasks
    assert not any("oasis_pair" in n for n in real.names)


def test_holdout_matches_the_benchmark_cases():
    tasks = pytest.importorskip("benchmarks.tasks", reason="the benchmark package is in the repository only")
    for task in ("oasis", "prostate", "mr_us", "histology"):
        for case in tasks.cases(task):
            root = tasks.data_root()
            for path in (case.moving, case.fixed):
                assert HOLDOUT.excludes(str(path.relative_to(root))), (task, path)


@pytest.mark.slow
def test_torchrun_ddp_two_processes(tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "napari_register.training",
           "--method", "carl", "--dim", "2", "--out", str(out), "--steps", "2", "--shape", "32", "32",
           "--threads", "1", "--device", "cpu", "--config", TINY,
           "--recipe-options", '{"warmup": 1, "real_fraction": 0}']
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["world_size"] == 2 and card["steps"] == 2


def test_init_starts_from_the_given_checkpoint(tmp_path):
    a = train(_args(tmp_path, 2, "a"))
    args = _args(tmp_path, 1, "b", seed=5)
    args.init, args.lr = str(a), 1e-12  # one step that cannot move the weights visibly
    b = train(args)
    wa, wb = (weights.load(p, "carl", 2, build)[0].state_dict() for p in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-8) for k in wa)
    assert json.loads(b.with_suffix(".json").read_text())["init"] == str(a)
    # a run from b records the whole chain: b's own start, a, inside b's lineage
    args = _args(tmp_path, 1, "c", seed=6)
    args.init = str(b)
    lineage = json.loads(train(args).with_suffix(".json").read_text())["init_from"]
    assert lineage["file"] == str(b) and lineage["steps"] == 1
    assert lineage["init_from"]["file"] == str(a) and lineage["init_from"]["steps"] == 2


def test_lncc_eps_option_changes_the_training_loss_and_is_on_the_card(tmp_path):
    # same seed, same pairs: only the LNCC's variance floor differs, so the first loss must differ
    a = train(_args(tmp_path, 1, "default", seed=5))
    b = train(_args(tmp_path, 1, "floor", seed=5, options='"lncc_eps": 0.5'))
    assert json.loads(a.with_suffix(".json").read_text())["train"]["lncc_eps"] == 1e-3
    assert json.loads(b.with_suffix(".json").read_text())["train"]["lncc_eps"] == 0.5
    # a floor far above every local variance makes each patch look flat: NCC ~0, the LNCC loss ~1
    floor, default = _log(tmp_path, "floor")[0]["sim"], _log(tmp_path, "default")[0]["sim"]
    assert abs(floor - 1) < 5e-3 and abs(default - floor) > 0.01
    with pytest.raises(ValueError, match="lncc_eps must be > 0"):
        train(_args(tmp_path, 1, "bad", options='"lncc_eps": 0'))


# --------------------------------------------------------------------- recipes of other shapes

class TwoParts(nn.Module):
    """A 'registration net' (a 2x3 affine matrix) and an 'encoder' (one linear layer)."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.reg = nn.Linear(2, 6)
        self.enc = nn.Linear(4, 4)


def _module(make_recipe):
    return SimpleNamespace(DIMS=(2,), OPTIONS={}, recipe=make_recipe)


def _batches(seed: int, with_truth: bool = False):
    gen = torch.Generator().manual_seed(seed)
    while True:
        batch = {"moving": torch.rand(2, 1, 8, 8, generator=gen), "fixed": torch.rand(2, 1, 8, 8, generator=gen)}
        if with_truth:
            batch["truth_matrix"] = torch.eye(3).expand(2, 3, 3) + 0.1 * torch.randn(2, 3, 3, generator=gen)
        yield batch


def test_alternating_phases_each_change_only_their_own_parameters(tmp_path):
    seen: list[tuple[str, dict[str, torch.Tensor]]] = []

    def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def geometry(model, batch, step):  # trains model.reg only (the other part's output is detached)
        seen.append(("geometry", snapshot(model)))
        z = model.enc(batch["fixed"].flatten(1)[:, :4]).detach()
        return (model.reg(z[:, :2]) ** 2).mean(), {}

    def representation(model, batch, step):
        seen.append(("representation", snapshot(model)))
        return (model.enc(batch["moving"].flatten(1)[:, :4]) - 1).pow(2).mean(), {"rep": 1.0}

    def make(settings, options):
        return Recipe(config={"dim": 2}, build=TwoParts, batches=_batches, alternate=True,
                      optimisers={"R": Optimiser(lr=0.1, params=lambda m: m.reg.parameters()),
                                  "E": Optimiser(lr=0.1, params=lambda m: m.enc.parameters(),
                                                 make=lambda p, lr: torch.optim.AdamW(p, lr=lr))},
                      phases=[Phase("geometry", geometry, "R"), Phase("representation", representation, "E")])

    args = _args(tmp_path, 3, "alt", method="toy")
    args.recipe_options, args.config = "{}", "{}"
    train(args, module=_module(make))
    assert [name for name, _ in seen] == ["geometry", "representation"] * 3
    final = weights.load(tmp_path / "alt.pt", "toy", 2, TwoParts)[0].state_dict()
    states = [s for _, s in seen] + [final]
    for (name, before), after in zip(seen, states[1:]):  # what each phase's update changed
        changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
        assert changed == {"reg" if name == "geometry" else "enc"}, (name, changed)
    log = _log(tmp_path, "alt")
    assert set(log[0]) >= {"geometry/loss", "representation/loss", "representation/rep"}


def test_a_batch_carrying_a_ground_truth_matrix_reaches_the_loss(tmp_path):
    received: list[torch.Tensor] = []

    def supervised(model, batch, step):
        received.append(batch["truth_matrix"].clone())
        pred = model.reg(torch.ones(batch["truth_matrix"].shape[0], 2)).view(-1, 2, 3)
        return (pred - batch["truth_matrix"][:, :2]).abs().mean(), {}

    def make(settings, options):
        return Recipe(config={"dim": 2}, build=TwoParts, batches=lambda seed: _batches(seed, with_truth=True),
                      optimisers={"net": Optimiser(lr=0.05)}, phases=[Phase("supervised", supervised)])

    args = _args(tmp_path, 40, "sup", method="toy")
    args.recipe_options, args.config, args.save_every = "{}", "{}", 40
    train(args, module=_module(make))
    expected = next(_batches(0, with_truth=True))["truth_matrix"]  # data seed = 1000 * seed + rank = 0
    torch.testing.assert_close(received[0], expected)
    log = _log(tmp_path, "sup")
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]  # the truth drives the fit


def test_an_update_with_a_non_finite_gradient_is_skipped_and_logged(tmp_path):
    def loss(model, batch, step):
        out = model.reg(torch.ones(2, 2)).pow(2).mean()
        if step == 1:  # finite loss, infinite gradient: sqrt at 0
            return out + (out * 0).sqrt(), {}
        return out, {}

    def make(settings, options):
        return Recipe(config={"dim": 2}, build=TwoParts, batches=_batches,
                      optimisers={"net": Optimiser(lr=0.1)}, phases=[Phase("fit", loss)])

    args = _args(tmp_path, 3, "nan", method="toy")
    args.recipe_options, args.config, args.save_every = "{}", "{}", 1
    train(args, module=_module(make))
    log = _log(tmp_path, "nan")
    assert [e.get("skipped", 0) for e in log] == [0, 1, 0]
    final = weights.load(tmp_path / "nan.pt", "toy", 2, TwoParts)[0]
    assert all(torch.isfinite(p).all() for p in final.parameters())
