"""Which decoder settings a script runs: decode.py's --method (auto for this device, a named method, or the
sweep's choice) with its size flags over the defaults, and bench.py's fastest settings of each model (swept
now, or read from an earlier sweep on the same GPU)."""
import json
from pathlib import Path

from jfmini.runtime.errors import UserError
from jfmini.runtime.writes import atomic_write
from jfmini.runtime.engine import METHODS, SETTINGS
from jfmini.runtime.files import read_sweep
from jfmini.tools.rows import SWEEP, SWEEP_BASE, describe, sweep


def decoder_settings(cfg, cuda):
    """(the method's name, its settings): auto resolved for this device, the defaults overridden by any size
    flag given."""
    sized = any(getattr(cfg, k) is not None for k in SETTINGS)      # size flags describe a parallel decoder
    method = cfg.method if cfg.method != "auto" else "ngram" if cuda else "jacobi" if sized else "ar"
    if method == "best":
        if not Path(cfg.sweep_file).is_file():
            what = "is not a file" if Path(cfg.sweep_file).exists() else "is missing"
            raise UserError(f"--method best reads the sweep's choice from {cfg.sweep_file}, which {what}; run "
                            f"`python bench.py --sweep` first (or pass --sweep_file)")
        s = dict(read_sweep(cfg.sweep_file, "--sweep_file")["best"])
    else:
        s = dict(METHODS[method])
    for k in SETTINGS:
        if getattr(cfg, k) is not None:
            s[k] = getattr(cfg, k)
    return method, s


def best_settings(cfg, models, prompts, saved, gpu, eot, compile, log, max_len, stops):
    """The fastest settings of each model: swept now (--sweep, kept in --sweep_file) or read from an
    earlier sweep on the same GPU. Returns (best by model, sweep results or None)."""
    best, sweep_results, sweep_path = {}, None, Path(cfg.sweep_file)
    if cfg.sweep:
        few = prompts[:cfg.sweep_prompts]
        log(f"sweep: {len(SWEEP)} configurations of the JF model, {len(SWEEP_BASE)} n-gram configurations of the "
            f"base model, on {len(few)} prompts")
        jf_results, best["jf"] = sweep(models["jf"], SWEEP, few, cfg, eot, compile, log, max_len, stops)
        base_results, best["base"] = sweep(models["base"], SWEEP_BASE, few, cfg, eot, compile, log, max_len, stops, 2)
        sweep_results = {"jf": jf_results, "base": base_results}
        saved = {"device": gpu, "best": best["jf"], "base_best": best["base"], "results": sweep_results}
        atomic_write(sweep_path, json.dumps(saved).encode())
        log(f"sweep: fastest JF settings {describe(best['jf'])}, base {describe(best['base'])}; kept in {sweep_path}")
    elif saved is not None:
        if saved.get("device") == gpu and "base_best" in saved:
            best = {"jf": saved["best"], "base": saved["base_best"]}
            log(f"best settings from the earlier sweep in {sweep_path}: JF {describe(best['jf'])}, "
                f"base {describe(best['base'])}")
    return best, sweep_results
