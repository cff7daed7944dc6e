"""The optimizer and RNG states a *_state.pt file holds for --resume, as untrusted input (files.py says
why): stored as tensors and plain types (torch.load(weights_only=True) builds nothing else), checked
against the live optimizer before they are loaded."""
import math

import numpy as np
import torch

from jfmini.runtime.errors import UserError
from jfmini.runtime.files import _is_int, _is_number


def optimizer_shape_ok(sd):
    """The outline of an optimizer's state_dict; load_optimizer_state checks it against the model."""
    return isinstance(sd, dict) and set(sd) == {"state", "param_groups"} and isinstance(sd["state"], dict) \
        and isinstance(sd["param_groups"], list) and all(isinstance(g, dict) for g in sd["param_groups"])


def optimizer_problem(sd, opt):
    """What is wrong with a saved AdamW state_dict for the live optimizer `opt` (a phrase), or None: the
    same groups over the same parameters, and per parameter a step count and exp_avg, exp_avg_sq of its
    shape (float, finite; exp_avg_sq >= 0)."""
    live = opt.state_dict()["param_groups"]
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(sd["param_groups"]) != len(live):
        return f"{len(sd['param_groups'])} parameter groups, not {len(live)}"

    def plain(v):
        if isinstance(v, (tuple, list)):
            return all(_is_number(x) and math.isfinite(x) for x in v)
        return v is None or isinstance(v, bool) or _is_number(v) and math.isfinite(v)
    for g, want in zip(sd["param_groups"], live):
        if set(g) != set(want) or g["params"] != want["params"]:
            return "parameter groups of another optimizer or model"
        if not all(plain(v) for k, v in g.items() if k != "params"):
            return "an optimizer setting that is not a finite number"
    for i, s in sd["state"].items():
        if not _is_int(i) or not 0 <= i < len(params) or not isinstance(s, dict) \
                or set(s) != {"step", "exp_avg", "exp_avg_sq"}:
            return "state for parameters this model does not have"
        for k in ("exp_avg", "exp_avg_sq"):
            t = s[k]
            if not isinstance(t, torch.Tensor) or t.shape != params[i].shape or not t.is_floating_point() \
                    or not torch.isfinite(t).all() or (k == "exp_avg_sq" and (t < 0).any()):
                return f"an {k} that does not fit parameter {i}"
        step = s["step"].item() if isinstance(s["step"], torch.Tensor) and s["step"].numel() == 1 else s["step"]
        if not _is_number(step) or not math.isfinite(step) or step < 0:
            return f"a step count of {s['step']!r}"
    return None


def load_optimizer_state(opt, sd, path):
    """Load a saved AdamW state into `opt` once optimizer_problem finds nothing. The settings that belong to
    the device (fused, foreach, capturable) stay opt's: a state saved on a GPU resumes on a CPU."""
    if (bad := optimizer_problem(sd, opt)) is not None:
        raise UserError(f"{path}: its optimizer state holds {bad}; delete it and run the stage again without "
                        f"--resume")
    device_settings = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in opt.param_groups]
    opt.load_state_dict(sd)
    for g, keep in zip(opt.param_groups, device_settings):
        g.update(keep)


def rng_state():
    """The global RNGs' state as tensors and plain types (np.random.get_state() holds an ndarray)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                      "pos": int(pos), "has_gauss": int(has_gauss),
                                                      "cached_gaussian": float(gauss)}}


def rng_ok(r):
    if not isinstance(r, dict) or set(r) != {"torch", "numpy"}:
        return False
    t, n = r["torch"], r["numpy"]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != torch.get_rng_state().shape:
        return False
    if not isinstance(n, dict) or set(n) != {"name", "keys", "pos", "has_gauss", "cached_gaussian"}:
        return False
    keys = n["keys"]
    return (n["name"] == "MT19937" and isinstance(keys, torch.Tensor) and keys.dtype == torch.int64
            and keys.shape == (624,) and bool(((keys >= 0) & (keys < 2**32)).all()) and _is_int(n["pos"])
            and 0 <= n["pos"] <= 624 and n["has_gauss"] in (0, 1) and _is_number(n["cached_gaussian"]))


def set_rng_state(r):
    """Put back what rng_state() returned (checked by rng_ok when its file was read)."""
    torch.set_rng_state(r["torch"])
    n = r["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
