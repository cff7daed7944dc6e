"""The benchmark's measurement: the two models and the prompts that fit their context, the rows of the table,
and every prompt decoded by every row, with each row's speed and quality, also split by looping bodies."""
import gc
from dataclasses import replace

from jfmini.runtime.errors import UserError
from jfmini.runtime.tokenizers import completion_text
from jfmini.runtime.prompts import heldout_prompts
from jfmini.runtime.engine import METHODS
from jfmini.runtime.checkpoints import default_checkpoint, load_checkpoint
from jfmini.runtime.quality import LOOP_DISTINCT4, distinct4, score, summarize, truth_loss
from jfmini.tools.rows import describe, run_row, total, verified_per_step


def load_models(cfg, device, dtype):
    """The base and the Jacobi Forcing model, which must share a vocabulary: (models, val losses, paths,
    the base's checkpoint)."""
    paths = {"base": cfg.base_ckpt, "jf": cfg.ckpt or default_checkpoint()}
    models, vals, base_ck = {}, {}, {}
    for key, path in paths.items():
        model, ck = load_checkpoint(path, device, flag={"base": "--base_ckpt", "jf": "--ckpt"}[key])
        models[key], vals[key] = model.to(dtype).eval(), ck.get("val_loss", float("nan"))
        base_ck = ck if key == "base" else base_ck
    if (models["base"].cfg.vocab_size, models["base"].cfg.tokenizer) != (models["jf"].cfg.vocab_size,
                                                                          models["jf"].cfg.tokenizer):
        raise UserError(f"{cfg.base_ckpt} and {paths['jf']} use different vocabularies; pass the base model the "
                        f"Jacobi Forcing model was distilled from")
    return models, vals, paths, base_ck


def bench_prompts(cfg, enc, records, base_ck, context, log):
    """(cfg with max_new_tokens set, prompt records, their tokens): the prompts that fit the context;
    records None = the held-out functions of the base model's corpus."""
    if records is None:
        corpus = base_ck.get("train_config", {}).get("corpus") or "stdlib+torch+deps"
        records = heldout_prompts(corpus, enc, count=cfg.limit or 512)
    if cfg.max_new_tokens is None:                   # leave room for prompts: a quarter of the context
        cfg = replace(cfg, max_new_tokens=min(256, max(1, context // 4)))
        if cfg.max_new_tokens < 256:
            log(f"--max_new_tokens {cfg.max_new_tokens}: a quarter of the models' context of {context} tokens")
    fits = [r for r in records if len(enc.encode(r["prompt"], allowed_special="all")) + cfg.max_new_tokens <= context]
    if not fits:
        raise UserError(f"no prompt fits the models' context of {context} tokens with --max_new_tokens "
                        f"{cfg.max_new_tokens}; lower --max_new_tokens or use shorter prompts")
    if len(fits) < len(records):
        log(f"skipping {len(records) - len(fits)} prompts longer than the context allows")
    return cfg, fits, [enc.encode(r["prompt"], allowed_special="all") for r in fits]


def table_rows(best):
    """(row name, model, settings) of the table: the base model's AR, Jacobi and n-gram rows, the JF model's
    AR, Jacobi, n-gram and MR rows, and each model's best settings when a sweep found them."""
    ar, jacobi, mr = METHODS["ar"], METHODS["jacobi"], METHODS["mr"]
    return [("AR eager", "base", None), ("AR fast", "base", ar), ("Jacobi", "base", jacobi),
            ("n-gram", "base", METHODS["ngram"])] + ([("best", "base", best["base"])] if best else []) + \
           [("AR fast", "jf", ar), ("Jacobi", "jf", jacobi), ("n-gram", "jf", METHODS["ngram"]), ("MR", "jf", mr)] + \
           ([("best", "jf", best["jf"])] if best else [])


def measure(rows, models, vals, records, prompts, cfg, enc, eot, compile, max_len, device, log, stops):
    """Decode every prompt with every row's decoder: to what a user keeps (stops(prompts): a stop rule per
    prompt, or None with --stop none) and to full length. Speed and quality per row; quality is that of the
    kept text. Returns (results, {'kept': outputs per row, 'full': ...}, each model's AR fast outputs: the
    lossless references)."""
    body_loss = {}                                    # teacher-forced loss of the true bodies, nats per token
    known = [i for i, r in enumerate(records) if r.get("body")]
    for key, model in models.items():
        bodies = [enc.encode_ordinary(records[i]["body"])[:cfg.max_new_tokens] for i in known]
        nats, counts = truth_loss(model, [prompts[i] for i in known], bodies)
        body_loss[key] = sum(nats) / max(sum(counts), 1) if known else None
    kinds = ("kept", "full") if cfg.stop == "function" else ("full",)
    results, outputs, refs = [], {k: [] for k in kinds}, {k: {} for k in kinds}
    for name, key, settings in rows:
        use = prompts[:cfg.eager_limit] if settings is None else prompts
        row = {"row": name, "model": key, "settings": settings or "eager loop", "prompts": len(use),
               "decoder": describe(settings) if settings else "eager loop", "verified_per_step": verified_per_step(settings)}
        ar = settings == METHODS["ar"]
        passes = [((cfg.ar_stop_every if kind == "kept" else cfg.ar_sync_every) if ar else 1,
                   stops(use) if kind == "kept" else None) for kind in kinds]
        decoded, step = run_row(models[key], settings, use, cfg, eot, compile, passes, max_len)
        for kind, (outs, stats) in zip(kinds, decoded):
            texts = [completion_text(enc, o) for o in outs]
            row.update(speed(stats, texts, "kept_" if kind == "kept" else ""))
            if kind == kinds[0]:                      # quality: of the kept text, or the full one with --stop none
                q = summarize(score([r["prompt"] for r in records[:len(use)]], texts, outs,
                                    [r.get("body") for r in records[:len(use)]], device))
                row.update({k: v[0] for k, v in q.items()}, **{f"{k}_se": v[1] for k, v in q.items()},
                           parse_rate=q["parse"][0], val_loss=vals[key], body_loss=body_loss[key], step_us=step,
                           loops=[distinct4(o) < LOOP_DISTINCT4 for o in outs], per_prompt=stats, texts=texts)
            if kind == "full":
                row["full_loop"] = sum(distinct4(o) < LOOP_DISTINCT4 for o in outs) / len(outs)
            if name == "AR fast":
                refs[kind][key] = outs                # the model's own greedy output: the lossless reference
            outputs[kind].append(outs)
        gc.collect()
        results.append(row)
        log(f"{name} ({key}, {row['decoder']}): " + "; ".join(
            f"{kind} TPF {row[p + 'tokens_per_forward']:.2f}, {row[p + 'tokens_per_s']:,.0f} tokens/s"
            for kind, p in (("kept", "kept_"), ("full", "")) if kind in kinds))
    split_by_loops(results, cfg.stop == "function")
    return results, outputs, refs


def speed(stats, texts, prefix):
    """A row's speed over its prompts: tokens, characters, forwards, TPF, tokens/s, characters/s, time per
    forward, prefill; keys prefixed ('kept_' for the kept text)."""
    st, chars = total(stats), sum(map(len, texts))
    return {f"{prefix}{k}": v for k, v in {
        "tokens": st.new_tokens, "chars": chars, "forwards": st.forwards, "forwards_run": st.ran,
        "tokens_per_forward": st.tokens_per_forward, "chars_per_forward": chars / max(st.forwards, 1),
        "tokens_per_s": st.tokens_per_s, "chars_per_s": chars / max(st.decode_s, 1e-9), "seconds": st.decode_s,
        "us_per_forward": 1e6 * st.decode_s / max(st.ran, 1), "prefill_ms": 1e3 * st.prefill_s / len(stats)}.items()}


def split_by_loops(results, kept):
    """Each row's speed on the prompts whose body loops (distinct-4 below LOOP_DISTINCT4 in its model's AR
    fast output, so every decoder of a model splits the same prompts) and on those whose body does not."""
    own = {r["model"]: r["loops"] for r in results if r["row"] == "AR fast"}
    p = "kept_" if kept else ""
    for r in results:
        loops = own[r["model"]][:r["prompts"]]
        for group, want in (("loop", True), ("noloop", False)):
            idx = [i for i, x in enumerate(loops) if x == want]
            st = total(r["per_prompt"][i] for i in idx)
            chars = sum(len(r["texts"][i]) for i in idx)
            r.update({f"{p}{group}_prompts": len(idx), f"{p}{group}_tokens": st.new_tokens,
                      f"{p}{group}_tokens_per_forward": st.tokens_per_forward if idx else None,
                      f"{p}{group}_tokens_per_s": st.tokens_per_s if idx else None,
                      f"{p}{group}_chars_per_s": chars / max(st.decode_s, 1e-9) if idx else None})
    for r in results:
        del r["per_prompt"], r["texts"], r["loops"]
