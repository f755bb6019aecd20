"""How ``agentrl tail`` prints a trajectory: one line, a full transcript, or a JSON line (pure; no I/O).

The line format (one trajectory per line)::

    #SEQ   ID           g=GROUP    r=REWARD status    turns=N tok=TRAINED/TOTAL vMIN..MAX stale=S w=WORKER env=ENV [flags]

``stale`` is the newest policy version seen on the stream so far minus the oldest version among the
trajectory's sampled tokens; flags are ``eval``, ``attempt=K`` (a retried or resumed task), ``resumed``
and ``aborts=K`` (abort markers: where earlier attempts were cut).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

from agentrl.inspect.rows import row_of
from agentrl.inspect.summary import Record, Summary
from agentrl.inspect.tokens import TokenText
from agentrl.messages import Trajectory, Turn

__all__ = ["Segment", "format_json", "format_line", "format_transcript", "segments", "short_id"]

_GREEN, _DIM, _RED, _BOLD, _RESET = "\x1b[32m", "\x1b[2m", "\x1b[31m", "\x1b[1m", "\x1b[0m"
_JSON = msgspec.json.Encoder()


def short_id(traj_id: str) -> str:
    """The first 12 characters, keeping an attempt suffix visible (``abcdef12-1``)."""
    head, sep, tail = traj_id.rpartition("-")
    if sep and tail.isdigit() and len(head) > 8:
        return f"{head[:8]}-{tail}"
    return traj_id[:12]


def format_line(s: Summary) -> str:
    """The one-line form of a trajectory (see the module docstring)."""
    versions = f"v{s.version_min}..{s.version_max}" if s.version_min >= 0 else "v-"
    flags = [name for name, on in (("eval", s.is_eval), (f"attempt={s.attempt}", s.attempt > 0),
                                   ("resumed", s.resumed), (f"aborts={s.aborts}", s.aborts > 0)) if on]
    return (
        f"#{s.seq:<6} {short_id(s.id):<12} g={s.group_id[:8]:<8} r={s.reward:+.3f} {s.status:<9} "
        f"turns={s.turns} tok={s.trained}/{s.tokens} {versions} stale={s.staleness} "
        f"w={s.worker or '-'} env={s.env or '-'}" + "".join(f" {f}" for f in flags)
    )


def format_json(record: Record, text: str | None = None) -> str:
    """One JSON object on one line: the row schema of :mod:`agentrl.inspect.rows`."""
    return _JSON.encode(row_of(record, text)).decode()


@dataclass(frozen=True)
class Segment:
    """A stretch of the token sequence: a turn of the log, or tokens no turn covers (``turn`` is None).

    A turn that a zero-token marker (an abort) falls inside is split around it: its pieces have
    ``part`` 1, 2, ... (0 = the whole turn).
    """

    start: int
    end: int
    turn: Turn | None
    kind: str
    part: int = 0


def _split(turn: Turn, markers: list[Turn]) -> Iterator[Segment]:
    """``turn`` in pieces around the markers inside it, each marker between its two pieces."""
    inside = [m for m in markers if turn.start < m.start < turn.end]
    if not inside:
        yield Segment(turn.start, turn.end, turn, turn.kind)
        return
    pos = turn.start
    for part, marker in enumerate(inside, 1):
        yield Segment(pos, marker.start, turn, turn.kind, part)
        yield Segment(marker.start, marker.start, marker, marker.kind)
        pos = marker.start
    yield Segment(pos, turn.end, turn, turn.kind, len(inside) + 1)


def segments(traj: Trajectory) -> Iterator[Segment]:
    """The turn log in token order, with the tokens no turn covers (e.g. a prompt without a prompt turn) filled in
    and every zero-token marker (abort, error) at its token position, inside a turn if it fell there."""
    spans = [t for t in traj.turns if t.end > t.start]
    markers = [t for t in traj.turns if t.end <= t.start]
    nested = {id(m) for m in markers for t in spans if t.start < m.start < t.end}
    pos = 0
    for turn in sorted(spans + [m for m in markers if id(m) not in nested], key=lambda t: (t.start, t.end > t.start)):
        if turn.start > pos:
            yield Segment(pos, turn.start, None, "prompt" if pos == 0 and turn.start <= traj.prompt_len else "tokens")
        yield from _split(turn, markers) if turn.end > turn.start else [Segment(turn.start, turn.end, turn, turn.kind)]
        pos = max(pos, turn.end)
    if pos < traj.num_tokens:
        yield Segment(pos, traj.num_tokens, None, "prompt" if pos == 0 else "tokens")


def _mask_runs(mask: np.ndarray) -> str:
    if not mask.size:
        return "no tokens"
    trained = int(np.count_nonzero(mask))
    if trained == mask.size:
        return f"trained {trained}"
    return f"masked {mask.size}" if trained == 0 else f"trained {trained}/{mask.size}"


def _header(traj: Trajectory, seg: Segment) -> str:
    turn = seg.turn
    parts = [f"[{seg.kind}{' ' + turn.tool if turn is not None and turn.tool else ''}"
             f"{f' (part {seg.part})' if seg.part else ''}]"]
    if seg.end > seg.start:
        parts.append(f"tokens {seg.start}..{seg.end}")
        parts.append(_mask_runs(traj.loss_mask[seg.start:seg.end]))
        sampled = traj.versions[seg.start:seg.end]
        sampled = sampled[sampled >= 0]
        if sampled.size:
            parts.append(f"v{int(sampled.min())}..{int(sampled.max())}")
    elif turn is not None and turn.kind == "abort":
        attempt = turn.info.get("attempt")
        who = f"attempt {attempt}" if attempt is not None else "an earlier attempt"
        parts.append(f"at token {seg.start}: {who} was cut here")
    if turn is not None:
        temperature = getattr(turn, "temperature", None)
        parts += [f"{k}={v}" for k, v in (("T", temperature), ("finish", turn.finish_reason),
                                          ("reward", turn.reward)) if v is not None]
        if turn.seconds:
            parts.append(f"{turn.seconds:.2f}s")
    return " ".join(parts)


def _turn_text(seg: Segment, tokens: TokenText | None) -> str:
    """The turn's own text; for a piece of a split turn, its decoded tokens (or, without a tokenizer, the whole
    turn's text on its last piece)."""
    if seg.turn is None or not seg.turn.text:
        return ""
    if not seg.part:
        return seg.turn.text
    if tokens is not None:
        return ""  # decoded from the piece's own tokens
    return f"(the whole turn) {seg.turn.text}" if seg.end == seg.turn.end else ""


def _body(traj: Trajectory, seg: Segment, tokens: TokenText | None, per_token: bool, colour: bool) -> str:
    ids = traj.tokens[seg.start:seg.end]
    if per_token and tokens is not None and ids.size:
        return _token_body(tokens.pieces(ids.tolist()), traj.loss_mask[seg.start:seg.end], colour)
    text = _turn_text(seg, tokens)
    if not text and ids.size:
        text = tokens.decode(ids.tolist()) if tokens is not None else f"({ids.size} tokens; no tokenizer to show them)"
    if not colour or not text:
        return text
    trained = ids.size > 0 and bool(traj.loss_mask[seg.start:seg.end].all())
    return f"{_GREEN if trained else _DIM}{text}{_RESET}"


def _token_body(pieces: list[str], mask: np.ndarray, colour: bool) -> str:
    """Every token, trained ones marked: green with colour, else inside ⟦ ⟧."""
    out: list[str] = []
    inside = False
    for piece, m in zip(pieces, mask.tolist(), strict=True):
        if bool(m) != inside:
            inside = bool(m)
            out.append((_GREEN if inside else _RESET) if colour else ("⟦" if inside else "⟧"))
        out.append(piece)
    if inside:
        out.append(_RESET if colour else "⟧")
    return "".join(out)


def format_transcript(
    record: Record, summary: Summary, *, tokens: TokenText | None = None, per_token: bool = False,
    colour: bool = False,
) -> str:
    """The whole trajectory turn by turn: roles, tool calls and outputs, and which tokens are trained."""
    traj = record.traj
    bold, reset = (_BOLD, _RESET) if colour else ("", "")
    lines = [f"{bold}━━ {format_line(summary)}{reset}",
             f"   id {traj.id}  task {traj.task_id}  group {traj.group_id} ({traj.group_size})"]
    for seg in segments(traj):
        header = _header(traj, seg)
        if seg.kind in ("abort", "error") and colour:
            header = f"{_RED}{header}{reset}"
        lines.append(header)
        body = _body(traj, seg, tokens, per_token, colour)
        if body:
            lines.extend("    " + line for line in body.splitlines())
    return "\n".join(lines)
