"""Needle-in-a-haystack retrieval through compressed KV caches, against mlx-lm's fp16 cache.

Protocol. The haystack is deterministic filler: the texts under /usr/share/common-licenses
(sorted by name, duplicates and links skipped) concatenated. A needle sentence, "The secret
passphrase is <word>-<4 digits>.", is put on its own line at a relative depth of the filler
(0 = first line, 1 = last line; the insertion point snaps to the nearest line boundary, the
actual depth is reported). The question follows the filler in the same user turn, and the
model's chat template wraps it. For a context ``length`` the prompt holds at most ``length -
max_answer_tokens`` tokens, so prompt and answer fit in ``length`` positions.

Each cache setting (the grammar of :class:`turboquant.mlx_eval.Setting`, e.g. ``3+s4+w64``)
prefills the prompt through its own cache, ``prefill_step`` tokens at a time as mlx-lm's
``generate`` does, then decodes greedily one token at a time until EOS or
``max_answer_tokens``. Success: the passphrase appears in the answer (case-insensitive).
KL: mean over the positions of the fp16 cache's answer of KL(fp16 || setting) of the
next-token distributions, teacher-forced on the fp16 answer. Positions up to the first token
where the setting's greedy answer differs from the fp16 one come from its greedy run; after
that the cache is trimmed back to the divergence and fed the fp16 answer one token at a time
(a cache that cannot be trimmed that far, e.g. a full rotating window, prefills the prompt
again).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from turboquant.mlx_eval import Setting, make_cache

FILLER_DIR = "/usr/share/common-licenses"
NEEDLE = "The secret passphrase is {code}."
QUESTION = ("What is the secret passphrase mentioned in the text above? "
            "Answer with the passphrase only.")
# Plain prompt for tokenizers without a chat template.
PLAIN_TEMPLATE = "{content}\nAnswer:"
WORDS = ("amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo",
         "jasper", "kestrel", "lantern", "meadow", "nutmeg", "onyx", "pepper", "quartz",
         "raven", "saffron", "timber", "umber", "violet", "walnut", "yarrow", "zephyr")
DEFAULT_SETTINGS = ("fp16", "4", "3", "4+s4+w64", "3+s4+w64")
_MARK = "\x00HAYSTACK\x00"


def filler_text(paths: str | Path | list | tuple = FILLER_DIR) -> str:
    """The haystack text: the files of a directory (sorted by name; links and files whose
    content was already taken are skipped), or the given files in order, joined by a blank
    line."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.is_symlink())
        else:
            files = [p]
    else:
        files = [Path(f) for f in paths]
    seen, parts = set(), []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ValueError(f"needle: cannot read filler text {str(f)!r}: {e.strerror}") from None
        digest = hashlib.sha256(text.encode()).digest()
        if digest in seen or not text.strip():
            continue
        seen.add(digest)
        parts.append(text.strip())
    if not parts:
        raise ValueError(f"needle: no filler text found in {paths!r}")
    return "\n\n".join(parts) + "\n"


def passphrase(seed: int, length: int, depth: float) -> str:
    """A word-digit code, fixed by (seed, length, depth), different between the cases."""
    rng = np.random.default_rng([int(seed), int(length), round(depth * 1000)])
    return f"{WORDS[int(rng.integers(len(WORDS)))]}-{int(rng.integers(1000, 10000))}"


def _encode(tokenizer, text: str, first: bool) -> list[int]:
    # the chat template's text carries the BOS token where the model wants one (mlx-lm's
    # generate does the same check)
    bos = getattr(tokenizer, "bos_token", None)
    special = first and not (bos and text.startswith(bos))
    try:
        return list(tokenizer.encode(text, add_special_tokens=special))
    except TypeError:  # tokenizers without the keyword
        return list(tokenizer.encode(text))


def prompt_frame(tokenizer, question: str = QUESTION) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: the chat template's user turn holding the
    haystack, a blank line and the question, with the generation prompt."""
    content = _MARK + "\n\n" + question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = PLAIN_TEMPLATE.format(content=content)
    before, after = text.split(_MARK)
    return _encode(tokenizer, before, first=True), _encode(tokenizer, after, first=False)


def line_starts(tokenizer, ids: list[int]) -> list[int]:
    """Positions in ``ids`` where a line starts: 0, and after every token that ends a line
    (byte-pair tokenizers often merge a newline with the next line's indentation)."""
    out = [0]
    for i, t in enumerate(ids):
        if tokenizer.decode([t]).rstrip(" \t").endswith("\n"):
            out.append(i + 1)
    return out


@dataclass
class Haystack:
    tokens: list[int]
    code: str
    length: int
    depth: float
    depth_actual: float
    needle_start: int  # position of the needle's first token in ``tokens``
    needle_tokens: int
    filler_tokens: int


def build_haystack(tokenizer, filler_ids: list[int], length: int, depth: float, code: str,
                   max_answer_tokens: int, frame: tuple[list[int], list[int]] | None = None,
                   starts: list[int] | None = None) -> Haystack:
    """The prompt of one case: frame start, filler with the needle line at ``depth``, frame
    end; at most ``length - max_answer_tokens`` tokens, the filler cut at a line end."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle: depth must be in [0, 1], got {depth}")
    before, after = frame if frame is not None else prompt_frame(tokenizer)
    needle = _encode(tokenizer, NEEDLE.format(code=code) + "\n", first=False)
    room = length - max_answer_tokens - len(before) - len(after) - len(needle)
    if room < 1:
        raise ValueError(f"needle: a context of {length} tokens leaves no room for filler "
                         f"(frame {len(before) + len(after)}, needle {len(needle)}, answer "
                         f"{max_answer_tokens} tokens)")
    if starts is None:
        starts = line_starts(tokenizer, filler_ids[:room + 1])
    # the filler ends at the last line end that fits
    n = max((s for s in starts if s <= room), default=0)
    if n == 0:
        raise ValueError(f"needle: the filler text has no complete line within {room} tokens "
                         f"(it holds {len(filler_ids)} tokens)")
    if n < room and len(filler_ids) < room:
        raise ValueError(f"needle: the filler text holds {len(filler_ids)} tokens, a context of "
                         f"{length} needs about {room}: give a longer text")
    # the needle goes at the line start nearest to depth * n
    at = min((s for s in starts if s <= n), key=lambda s: (abs(s - depth * n), s))
    tokens = before + filler_ids[:at] + needle + filler_ids[at:n] + after
    return Haystack(tokens=tokens, code=code, length=length, depth=depth,
                    depth_actual=at / n, needle_start=len(before) + at,
                    needle_tokens=len(needle), filler_tokens=n)


def _eos_ids(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        one = getattr(tokenizer, "eos_token_id", None)
        ids = [] if one is None else [one]
    return {int(i) for i in ids}


def _step(model, cache, ids: list[int]) -> mx.array:
    logits = model(mx.array(ids)[None], cache=cache)
    return logits[0, -1].astype(mx.float32)


def prefill(model, cache, tokens: list[int], step: int) -> np.ndarray:
    """Feeds ``tokens`` through ``cache``, ``step`` at a time, and returns the logits after
    the last one. All but the last token go through the transformer body only (mlx-lm
    models keep it as ``model.model``), so no vocabulary projection is spent on them."""
    body = getattr(model, "model", None)
    for i in range(0, len(tokens) - 1, step):
        ids = mx.array(tokens[i:min(i + step, len(tokens) - 1)])[None]
        mx.eval(body(ids, cache=cache) if body is not None else model(ids, cache=cache))
    last = _step(model, cache, tokens[-1:])
    mx.eval(last)
    return np.array(last)


def greedy(model, cache, tokens: list[int], max_tokens: int, eos: set[int],
           step: int) -> tuple[list[int], list[np.ndarray], int]:
    """Greedy answer: its tokens, the logits each was chosen from, and how many of them
    were fed back into the cache."""
    logits = prefill(model, cache, tokens, step)
    out, dists, fed = [], [], 0
    while True:
        dists.append(logits)
        out.append(int(np.argmax(logits)))
        if out[-1] in eos or len(out) == max_tokens:
            return out, dists, fed
        logits = _step(model, cache, [out[-1]])
        mx.eval(logits)
        logits = np.array(logits)
        fed += 1


def kl(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(ref || got) of the softmax of each row of logits."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lr, lg = log_softmax(ref), log_softmax(got)
    return np.sum(np.exp(lr) * (lr - lg), -1)


def found(answer: str, code: str) -> bool:
    return code.lower() in answer.lower()


@dataclass
class CaseResult:
    setting: str
    answer: str
    found: bool
    same_answer: bool  # the greedy tokens equal the fp16 cache's
    kl: float  # mean KL(fp16 || setting) over the fp16 answer's positions
    kl_max: float
    seconds: float


@dataclass
class Case:
    length: int
    depth: float
    depth_actual: float
    prompt_tokens: int
    needle_start: int
    code: str
    results: list[CaseResult] = field(default_factory=list)


def run_setting(model, tokenizer, hay: Haystack, setting: Setting, max_tokens: int,
                step: int, seed: int, ref: tuple[list[int], list[np.ndarray]] | None):
    """One setting on one haystack: (answer tokens, logits, CaseResult fields)."""
    eos = _eos_ids(tokenizer)
    cache = make_cache(model, setting, seed)
    answer, dists, fed = greedy(model, cache, hay.tokens, max_tokens, eos, step)
    if ref is None:
        return answer, dists
    ref_answer = ref[0]
    k = next((i for i, (a, b) in enumerate(zip(answer, ref_answer)) if a != b),
             min(len(answer), len(ref_answer)))
    forced = dists[:min(k + 1, len(ref_answer))]
    if len(forced) < len(ref_answer):
        # teacher-force the rest of the fp16 answer from the divergence at k
        back = fed - k
        if all(c.is_trimmable() and getattr(c, "max_trim", lambda: back)() >= back
               for c in cache):
            for c in cache:
                c.trim(back)
        else:
            cache = make_cache(model, setting, seed)
            prefill(model, cache, hay.tokens + ref_answer[:k], step)
        for t in ref_answer[k:len(ref_answer) - 1]:
            logits = _step(model, cache, [t])
            mx.eval(logits)
            forced.append(np.array(logits))
    return answer, forced


def evaluate(model, tokenizer, settings: list[Setting], lengths: list[int],
             depths: list[float], seed: int = 0, max_answer_tokens: int = 24,
             prefill_step: int = 2048, filler: str | None = None, log=print) -> list[Case]:
    """Every setting (the fp16 reference first, added when missing) on every (length,
    depth) haystack."""
    if not lengths or not depths:
        raise ValueError("needle: give at least one length and one depth")
    if max_answer_tokens < 1 or prefill_step < 1:
        raise ValueError("needle: max_answer_tokens and prefill_step must be >= 1")
    settings = [Setting.parse("fp16")] + [s for s in settings if s.kind != "fp16"]
    filler_ids = _encode(tokenizer, filler if filler is not None else filler_text(), first=False)
    frame = prompt_frame(tokenizer)
    cases = []
    for length in lengths:
        starts = line_starts(tokenizer, filler_ids[:length + 1])
        for depth in depths:
            code = passphrase(seed, length, depth)
            hay = build_haystack(tokenizer, filler_ids, length, depth, code, max_answer_tokens,
                                 frame, starts)
            case = Case(length, depth, hay.depth_actual, len(hay.tokens), hay.needle_start, code)
            ref = None
            for s in settings:
                t0 = time.perf_counter()
                answer, dists = run_setting(model, tokenizer, hay, s, max_answer_tokens,
                                            prefill_step, seed, ref)
                text = tokenizer.decode(answer)
                if ref is None:
                    ref = (answer, dists)
                d = kl(np.stack(ref[1]), np.stack(dists))
                r = CaseResult(s.name, text, found(text, code), answer == ref[0],
                               float(d.mean()), float(d.max()), time.perf_counter() - t0)
                case.results.append(r)
                log(f"  {length} tokens, depth {hay.depth_actual:.2f}, {s.name}: "
                    f"{'found' if r.found else 'missed'} {text.strip()!r} "
                    f"KL {r.kl:.4f} ({r.seconds:.1f}s)")
            cases.append(case)
    return cases


def summary(cases: list[Case]) -> list[dict]:
    """Per setting: cases found, cases where retrieval equals the fp16 cache's, same greedy
    answers, mean KL; and per length the same counts."""
    names = [r.setting for r in cases[0].results]
    out = []
    for i, name in enumerate(names):
        rs = [(c, c.results[i]) for c in cases]
        row = {"setting": name, "cases": len(rs),
               "found": sum(r.found for _, r in rs),
               "equal_to_fp16": sum(r.found == c.results[0].found for c, r in rs),
               "same_answer": sum(r.same_answer for _, r in rs),
               "kl_mean": float(np.mean([r.kl for _, r in rs])),
               "kl_max": float(max(r.kl_max for _, r in rs)),
               "by_length": {}}
        for length in dict.fromkeys(c.length for c in cases):
            sub = [(c, r) for c, r in rs if c.length == length]
            row["by_length"][str(length)] = {
                "found": sum(r.found for _, r in sub), "cases": len(sub),
                "pattern": "".join("+" if r.found else "-" for _, r in sub),
                "kl_mean": float(np.mean([r.kl for _, r in sub]))}
        out.append(row)
    return out


def format_table(rows: list[dict], depths: list[float]) -> str:
    """Plain-text table: per setting and length the found pattern over the depths."""
    lengths = list(rows[0]["by_length"])
    head = f"{'setting':<20}" + "".join(f"{'L=' + n:>12}" for n in lengths) + \
        f"{'found':>8}{'=fp16':>7}{'same':>6}{'KL mean':>9}{'KL max':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{b['pattern']:>12}" for b in r["by_length"].values())
        n = r["cases"]
        lines.append(f"{r['setting']:<20}{cells}{str(r['found']) + '/' + str(n):>8}"
                     f"{str(r['equal_to_fp16']) + '/' + str(n):>7}{r['same_answer']:>6}"
                     f"{r['kl_mean']:>9.4f}{r['kl_max']:>9.4f}")
    lines.append("pattern: + found / - missed at depths " + ",".join(f"{d:g}" for d in depths)
                 + "; =fp16: cases whose retrieval equals the fp16 cache's; same: identical "
                 "greedy answers; KL: KL(fp16 || setting) per answer token, teacher-forced")
    return "\n".join(lines)


def markdown_table(rows: list[dict], depths: list[float]) -> str:
    lengths = list(rows[0]["by_length"])
    lines = ["| setting | " + " | ".join(f"{n} tokens" for n in lengths)
             + " | found | = fp16 | same answer | KL mean | KL max |",
             "|---|" + "---:|" * (len(lengths) + 5)]
    for r in rows:
        cells = " | ".join(f"{b['found']}/{b['cases']} `{b['pattern']}`"
                           for b in r["by_length"].values())
        lines.append(f"| {r['setting']} | {cells} | {r['found']}/{r['cases']} | "
                     f"{r['equal_to_fp16']}/{r['cases']} | {r['same_answer']}/{r['cases']} | "
                     f"{r['kl_mean']:.4f} | {r['kl_max']:.4f} |")
    return "\n".join(lines)
