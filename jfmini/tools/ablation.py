"""ablate.py's helpers: its flags' lists and variants parsed (one-line errors), a kept variant folder checked
before it is reused, and the rows appended to --results and tabled."""
import re
import shlex

from jfmini.runtime.errors import UserError
from jfmini.runtime.writes import file_sha256, write_failed
from jfmini.runtime.checkpoints import load_checkpoint
from jfmini.runtime.training import changed_flags
from jfmini.tools.config import ROUND_FLAGS


def split_flags(text, what):
    """shlex.split, with unbalanced quotes as a one-line error naming `what`."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UserError(f"{what}: {e} in {text!r}; balance its quotes") from None


def parse_variants(text):
    """[(name, flags)]. A name becomes a folder in out_dir/ablate (deleted afterwards without --keep), so it
    is letters, digits, '.', '_' and '-' only: no '/', no '..', nothing that leads out of out_dir."""
    variants = []
    for part in filter(str.strip, text.split(";")):
        name, sep, flags = part.partition(":")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"variant {part.strip()!r} needs the form 'name: --flag value ...'")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or ".." in name or name == "base":
            raise UserError(f"variant name {name!r} must be letters, digits, '.', '_' or '-' (up to 64, no '..', "
                            f"not 'base'): it names a folder in out_dir/ablate")
        variants.append((name, split_flags(flags, f"--variants {name}")))
    if not variants:
        raise UserError("--variants names no variant; give 'name: --flag value; ...'")
    if len({n for n, _ in variants}) != len(variants):
        raise UserError("variant names must differ")
    return variants


def int_list(text, flag, least):
    """'1,2,3' -> [1, 2, 3], each at least `least`, or a one-line error."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise UserError(f"{flag} must be comma-separated integers of at least {least} (got {text!r})")
    return values


def check_kept(vout, c, rounds, base):
    """A kept variant folder (--keep) is reused only if every round in it was distilled from this base
    model with this variant's flags; else it is refused before any work."""
    for r in range(1, rounds + 1):
        done = vout / f"jf{r}.pt"
        if not done.exists():
            continue
        ckpt = load_checkpoint(done)[1]
        changed = changed_flags(ckpt.get("train_config", {}), c, ROUND_FLAGS)
        if r == 1 and (not base.exists() or ckpt.get("source_sha256") != file_sha256(base)):
            changed.append(f"it was distilled from another {base.name}")
        if changed:
            raise UserError(f"{done} was distilled differently ({'; '.join(changed)}); delete {vout} or name the "
                            f"variant differently")


def append_line(path, line):
    """One JSON line onto --results; a failed write (disk full) is a one-line error, earlier rows kept."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise UserError(write_failed(path, e)) from None


def table(rows, block_lens):
    """One line per run: TPF per prompt set and block length, validation loss, and the quality of the greedy
    output on the held-out functions (parse, loop and blank rates, edit similarity and loss of the true
    body), each with its change from the base model, paired prompt by prompt."""
    keys = [f"kept_tpf_{s}_n{n}" for s in ("humaneval", "heldout") for n in block_lens]
    quality = ("parse", "loop", "blank", "edit_sim", "body_loss")
    head = f"{'variant':<22}{'seed':>6}" + "".join(f"{k[9:].replace('humaneval', 'HE').replace('heldout', 'HO'):>10}"
                                                   for k in keys) + f"{'val':>8}" + \
        "".join(f"{q.replace('_sim', '').replace('body_loss', 'body'):>15}" for q in quality) + f"{'train s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r[k]:>10.3f}" if isinstance(r.get(k), float) else f"{'-':>10}" for k in keys)
        val = r.get("val_loss")
        q = ""
        for k in quality:
            mean, delta = r.get(f"{k}_heldout"), r.get(f"delta_{k}_heldout")
            q += f"{'-' if mean is None else f'{mean:.3f}':>8}" + (f"{delta:+7.3f}" if delta is not None else " " * 7)
        lines.append(f"{r['variant']:<22}{r.get('seed', '-'):>6}{cells}{'-' if val is None else f'{val:.4f}':>8}{q}"
                     f"{r.get('train_s', 0):>9.0f}")
    return "\n".join(lines)
