"""Shared training loop: checkpoints with cards, resume, determinism, synthetic pairs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from napari_register import train, weights
from napari_register.methods.carl import build
from napari_register.synth import PROSTATE_EVAL, PairSource, RealVolumes

torch.set_num_threads(1)
TINY = '{"width": 4, "features": 8, "unet_channels": [4, 8]}'


def _args(tmp_path, steps: int, name: str = "tiny", seed: int = 0, extra: tuple[str, ...] = ()):
    return train.build_parser().parse_args([
        "--method", "carl", "--dim", "2", "--out", str(tmp_path / f"{name}.pt"), "--steps", str(steps),
        "--shape", "32", "32", "--real-fraction", "0", "--save-every", "2", "--warmup", "2",
        "--seed", str(seed), "--threads", "1", "--config", TINY, *extra])


def _log(tmp_path, name="tiny"):
    return [json.loads(line) for line in (tmp_path / f"{name}.run" / "log.jsonl").read_text().splitlines()]


def test_train_writes_a_loadable_checkpoint_with_its_card(tmp_path):
    path = train.main(_args(tmp_path, 3))
    card = json.loads(path.with_suffix(".json").read_text())
    for key in ("method", "dim", "config", "command", "data", "steps", "seed", "final_losses", "code_version",
                "sha256", "train"):
        assert key in card, key
    assert card["steps"] == 3 and card["dim"] == 2 and card["method"] == "carl"
    assert set(card["final_losses"]) >= {"loss", "sim", "reg"}
    net, _ = weights.load(path, "carl", 2, build)
    assert net(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    log = _log(tmp_path)
    assert [e["step"] for e in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)


def test_resume_continues_from_the_saved_step(tmp_path):
    train.main(_args(tmp_path, 2))
    first = weights.load(tmp_path / "tiny.pt", "carl", 2, build)[0].state_dict()
    train.main(_args(tmp_path, 4))  # same run dir: picks up at step 2
    assert [e["step"] for e in _log(tmp_path)] == [1, 2, 3, 4]
    card = json.loads((tmp_path / "tiny.json").read_text())
    assert card["steps"] == 4
    after = weights.load(tmp_path / "tiny.pt", "carl", 2, build)[0].state_dict()
    assert any(not torch.equal(first[k], after[k]) for k in first)


def test_same_seed_same_weights(tmp_path):
    a = train.main(_args(tmp_path, 2, "a", seed=3))
    b = train.main(_args(tmp_path, 2, "b", seed=3))
    c = train.main(_args(tmp_path, 2, "c", seed=4))
    wa, wb, wc = (weights.load(p, "carl", 2, build)[0].state_dict() for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_unknown_or_untrainable_method_is_refused(tmp_path):
    args = _args(tmp_path, 1)
    args.method = "optimize"
    with pytest.raises(ValueError, match="no network to train"):
        train.main(args)


def test_synthetic_pairs_in_range_and_deformed():
    src = iter(PairSource(3, (24, 24, 24), batch=2, real_fraction=0.0, seed=1))
    moving, fixed = next(src)
    assert moving.shape == fixed.shape == (2, 1, 24, 24, 24)
    assert 0 <= moving.min() and moving.max() <= 1
    assert (moving - fixed).abs().mean() > 0.02  # the two images differ (deformation, translation)


def test_real_volumes_exclude_the_evaluation_cases():
    real = RealVolumes()
    if not len(real):
        pytest.skip("../shared/data not present")
    names = real.names
    assert not any(n in name for n in PROSTATE_EVAL for name in names)
    assert not any("oasis_pair" in name for name in names)


@pytest.mark.slow
def test_torchrun_ddp_two_processes(tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "napari_register.train",
           "--method", "carl", "--dim", "2", "--out", str(out), "--steps", "2", "--shape", "32", "32",
           "--real-fraction", "0", "--warmup", "1", "--threads", "1", "--device", "cpu", "--config", TINY]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["world_size"] == 2 and card["steps"] == 2


def test_init_starts_from_the_given_checkpoint(tmp_path):
    a = train.main(_args(tmp_path, 2, "a"))
    args = _args(tmp_path, 1, "b", seed=5)
    args.init, args.lr = str(a), 1e-12  # one step that cannot move the weights visibly
    b = train.main(args)
    wa, wb = (weights.load(p, "carl", 2, build)[0].state_dict() for p in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-8) for k in wa)
    assert json.loads(b.with_suffix(".json").read_text())["init"] == str(a)


def test_lncc_eps_option_changes_the_training_loss_and_is_on_the_card(tmp_path):
    # same seed, same pairs: only the LNCC's variance floor differs, so the first loss must differ
    a = train.main(_args(tmp_path, 1, "default", seed=5))
    b = train.main(_args(tmp_path, 1, "floor", seed=5, extra=("--lncc-eps", "0.5")))
    assert json.loads(a.with_suffix(".json").read_text())["train"]["lncc_eps"] == 1e-3
    assert json.loads(b.with_suffix(".json").read_text())["train"]["lncc_eps"] == 0.5
    # a floor far above every local variance makes each patch look flat: NCC ~0, the LNCC loss ~1
    floor, default = _log(tmp_path, "floor")[0]["sim"], _log(tmp_path, "default")[0]["sim"]
    assert abs(floor - 1) < 5e-3 and abs(default - floor) > 0.01
    with pytest.raises(ValueError, match="--lncc-eps must be > 0"):
        train.main(_args(tmp_path, 1, "bad", extra=("--lncc-eps", "0")))
