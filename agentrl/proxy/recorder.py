"""One episode's OpenAI calls, turned into its trajectory.

Each request goes through the episode's :class:`~agentrl.agent.context.EpisodeContext`: the messages it adds to
the recorded conversation (:mod:`agentrl.proxy.conversation`) are rendered alone through the chat template and
appended as masked tokens (``ctx.start`` / ``ctx.add_messages``), and ``ctx.generate`` produces the reply, so
the trajectory holds exactly the tokens the engine consumed and produced — with their logprobs and per-token
versions — and aborts, routing and the context budget work as for any agent. What the proxy needs to resume
(the conversation as messages, the replies it gave, as JSON text) lives in ``ctx.state["openai_proxy"]``, saved
with a partial rollout.

Sampling is the task's (the run's policy, which the learner's logprobs assume): of a request's parameters only
``max_tokens`` / ``max_completion_tokens`` (which can only lower the task's ``max_new_tokens``) and ``stop``
apply; ``temperature``, ``top_p``, ``seed``, ``tool_choice``, ``response_format`` and the like are accepted and
ignored (the model is trained on what it does unconstrained), and ``n`` above 1 is refused.

Endings:

* an abort (APRIL, an engine loading weights, a stopping worker) cancels the agent's task: the episode is
  ``aborted`` with its cut reply recorded, and its agent runs again from the start; the proxy answers each
  request it already answered with the recorded reply (no generation) and continues the cut reply token for
  token. The agent's code must take the same path given the same replies; the environment steps it repeats
  meanwhile are answered from the episode's record, not stepped again
  (:meth:`~agentrl.env.episode.EpisodeEnv.replay_recorded_steps`), until the first reply generated anew;
* the context budget used up answers ``context_length_exceeded`` (400) and an engine failure 503: if the
  agent lets that error end the episode, the episode ends as a native agent's would (``truncated``; retried as
  an infrastructure failure), not as an agent error (:meth:`EpisodeRecorder.wrap_failure`).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec

from agentrl.agent.context import ContextExhausted, EpisodeAborted, EpisodeContext, ModelTurn
from agentrl.env.episode import EpisodeEnv
from agentrl.errors import EngineError, ProxyRequestError
from agentrl.messages import Turn
from agentrl.proxy.conversation import normalize_messages, normalize_tools, plan
from agentrl.proxy.replies import (
    assistant_message,
    chat_response,
    completion_response,
    finish_reason,
    logprobs_content,
)

__all__ = ["ChatBody", "CompletionBody", "EpisodeRecorder"]

STATE_KEY = "openai_proxy"


class _Body(msgspec.Struct):
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    stream: bool = False


class ChatBody(_Body):
    """A ``/v1/chat/completions`` request (fields the proxy uses; others are accepted and ignored)."""

    messages: list[Any] = msgspec.field(default_factory=list)
    tools: list[Any] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    logprobs: bool = False


class CompletionBody(_Body):
    """A ``/v1/completions`` request: ``prompt`` as text or token ids."""

    prompt: str | list[Annotated[int, msgspec.Meta(ge=0)]] = ""
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None


class EpisodeRecorder:
    """Serves one episode's requests, one at a time; ``agent_task`` is cancelled when the episode is aborted."""

    def __init__(self, ctx: EpisodeContext, agent_task: asyncio.Task[Any] | None, *, model: str) -> None:
        self.ctx = ctx
        self.agent_task = agent_task
        self.model = model
        self.lock = asyncio.Lock()
        self.error: BaseException | None = None  # what ended the last request, if the runtime must know
        if ctx.resumed and isinstance(ctx.env, EpisodeEnv):
            ctx.env.replay_recorded_steps()  # the agent runs again from its start

    def wrap_failure(self, exc: Exception) -> BaseException:
        """What the agent's failure ``exc`` really was: the runtime error behind the proxy's last refusal."""
        return self.error if self.error is not None else exc

    # ------------------------------------------------------------ chat

    async def chat(self, body: ChatBody) -> dict[str, Any]:
        async with self.lock:
            self.ctx.mark_safe_point()
            rec = self._recording("chat")
            messages = normalize_messages(body.messages)
            tools = normalize_tools(body.tools)
            recorded = [_load(m) for m in rec["messages"]]
            p = plan(recorded, {int(k) for k in rec["replies"]}, messages, resumed=self.ctx.resumed)
            if p.replay is not None:
                return self._chat_body(_load(rec["replies"][str(p.replay)]))
            self._append_messages(rec, p.new, tools)
            rec["pending"] = True
            limit = body.max_completion_tokens or body.max_tokens
            turn = await self._generate(limit, body.stop)
            message = assistant_message(turn.text)
            choice = {"message": message, "finish_reason": finish_reason(turn.finish_reason, message),
                      **self._extras(turn, logprobs=body.logprobs)}
            if choice["logprobs"] is not None:
                choice["logprobs"] = {"content": choice["logprobs"]}
            rec["replies"][str(len(rec["messages"]))] = _dump(choice)
            rec["messages"].extend(_dump(m) for m in normalize_messages([message]))
            rec["pending"] = False
            self.ctx.mark_safe_point()  # a cancel from now on keeps the reply (the resumed agent gets it replayed)
            return self._chat_body(choice)

    def _append_messages(self, rec: dict[str, Any], new: list[dict[str, Any]], tools: list[Any] | None) -> None:
        ctx = self.ctx
        if not rec["messages"]:
            if ctx.started:
                raise ProxyRequestError("the trajectory already holds tokens the proxy did not record (the agent "
                                        "called ctx.start or ctx.generate itself): use one or the other per episode")
            ctx.start(new, tools=tools)
            rec["tools"] = _dump(tools)
        elif tools != _load(rec["tools"]):
            raise ProxyRequestError("tools: differ from the first request's, which are rendered into the prompt "
                                    "once; send the same tools with every request of an episode", param="tools")
        elif new and rec["pending"]:
            raise ProxyRequestError(
                "messages: the recording ends with a model reply that was never delivered (cut by an abort or an "
                "engine failure); resend the same messages to get it before adding new ones",
                param="messages", code="history_mismatch")
        elif new or str(len(rec["messages"]) - 1) in rec["replies"]:
            kind = "tool" if new and all(m["role"] == "tool" for m in new) else "env"
            ctx.add_messages(new, kind=kind)
        rec["messages"].extend(_dump(m) for m in new)

    def _chat_body(self, choice: dict[str, Any]) -> dict[str, Any]:
        choice = dict(choice)
        n_in = choice.pop("prompt_tokens")
        return chat_response(choice, model=self.model, prompt_tokens=n_in, completion_tokens=len(choice["token_ids"]))

    # ------------------------------------------------------------ completions

    async def completion(self, body: CompletionBody) -> dict[str, Any]:
        async with self.lock:
            self.ctx.mark_safe_point()
            rec = self._recording("completions")
            replay = self._replay_completion(rec, body.prompt)
            if replay is not None:
                return self._completion_body(replay)
            self._append_prompt(rec, self._new_prompt_ids(rec, body.prompt))
            rec["pending"] = True
            turn = await self._generate(body.max_tokens or 16, body.stop)
            choice = {"text": turn.raw_text, "finish_reason": finish_reason(turn.finish_reason, {}),
                      **self._extras(turn, logprobs=body.logprobs is not None)}
            if choice["logprobs"] is not None:
                entries = choice["logprobs"]
                choice["logprobs"] = {"tokens": [e["token"] for e in entries],
                                      "token_logprobs": [e["logprob"] for e in entries]}
            rec["replies"][str(turn.start)] = _dump(choice)
            rec["pending"] = False
            self.ctx.mark_safe_point()
            return self._completion_body(choice)

    def _prefix_matches(self, prompt: str | list[int], end: int) -> bool:
        recorded = self.ctx.traj.token_ids[:end]
        if isinstance(prompt, list):
            return prompt == recorded.tolist()
        return prompt == self.ctx.chat.decode(recorded.tolist())

    def _replay_completion(self, rec: dict[str, Any], prompt: str | list[int]) -> dict[str, Any] | None:
        if not self.ctx.resumed:
            return None
        for start, choice in rec["replies"].items():
            if self._prefix_matches(prompt, int(start)):
                return _load(choice)
        return None

    def _new_prompt_ids(self, rec: dict[str, Any], prompt: str | list[int]) -> list[int]:
        """The tokens ``prompt`` adds to the recording (a pending reply's prompt must come back unchanged)."""
        end = rec["prompt_end"] if rec["pending"] else len(self.ctx.traj)
        recorded = self.ctx.traj.token_ids[:end].tolist()
        if isinstance(prompt, list):
            if prompt[:end] != recorded:
                raise _prompt_mismatch(end)
            new = prompt[end:]
        else:
            text = self.ctx.chat.decode(recorded) if end else ""
            if not prompt.startswith(text):
                raise _prompt_mismatch(end)
            new = self.ctx.chat.encode(prompt[len(text):]) if prompt[len(text):] else []
        if rec["pending"] and new:
            raise ProxyRequestError("prompt: the recording ends with a reply that was never delivered (cut by an "
                                    "abort or an engine failure); resend the same prompt to get it first",
                                    param="prompt", code="history_mismatch")
        return new

    def _append_prompt(self, rec: dict[str, Any], ids: list[int]) -> None:
        ctx = self.ctx
        if not ctx.started:
            if not ids:
                raise ProxyRequestError("prompt: empty", param="prompt")
            ctx.start(prompt_ids=ids)
        elif ids:
            start, end = ctx.traj.append_masked(ids)
            ctx.traj.turns.append(Turn(kind="env", start=start, end=end, text=ctx.chat.decode(ids)))
        if not rec["pending"]:
            rec["prompt_end"] = len(ctx.traj)

    def _completion_body(self, choice: dict[str, Any]) -> dict[str, Any]:
        choice = dict(choice)
        n_in = choice.pop("prompt_tokens")
        return completion_response(choice, model=self.model, prompt_tokens=n_in,
                                   completion_tokens=len(choice["token_ids"]))

    # ------------------------------------------------------------ shared

    def _recording(self, mode: str) -> dict[str, Any]:
        rec: dict[str, Any] = self.ctx.state.setdefault(
            STATE_KEY, {"mode": mode, "messages": [], "replies": {}, "tools": "null", "pending": False, "prompt_end": 0})
        if rec["mode"] != mode:
            raise ProxyRequestError(f"this episode records {rec['mode']} calls; it cannot mix in {mode} calls")
        return rec

    async def _generate(self, max_tokens: int | None, stop: str | list[str] | None) -> ModelTurn:
        """``ctx.generate`` with the request's limits; an abort cancels the agent (it resumes later)."""
        ctx = self.ctx
        overrides: dict[str, Any] = {}
        if max_tokens is not None:
            overrides["max_new_tokens"] = max_tokens
        if stop:
            overrides["stop"] = [*(ctx.sampling.stop or []), *([stop] if isinstance(stop, str) else stop)]
        if isinstance(ctx.env, EpisodeEnv):
            ctx.env.stop_replay()  # past the recorded replies: the agent's steps are live again
        try:
            turn = await ctx.generate(**overrides)
        except EpisodeAborted:
            ctx.request_abort()
            if self.agent_task is not None:
                self.agent_task.cancel()
            raise
        except (ContextExhausted, EngineError) as exc:
            self.error = exc
            raise
        self.error = None
        return turn

    def _extras(self, turn: ModelTurn, *, logprobs: bool) -> dict[str, Any]:
        """agentrl extras every choice carries (ignored by OpenAI clients), and the logprobs when asked for."""
        traj = self.ctx.traj
        ids = traj.token_ids[turn.start:turn.end].tolist()
        lps = traj.logprobs[turn.start:turn.end].tolist()
        entries = logprobs_content([self.ctx.chat.decode([t]) for t in ids], lps) if logprobs else None
        return {"logprobs": entries, "token_ids": ids, "token_versions": traj.versions[turn.start:turn.end].tolist(),
                "prompt_tokens": turn.start}


def _dump(value: Any) -> str:
    """Recorded messages and replies are kept as JSON text: the state is deep-copied at every safe point, and a
    string copies in O(1) where a nested reply would cost O(its size) each time."""
    return msgspec.json.encode(value).decode()


def _load(text: str) -> Any:
    return msgspec.json.decode(text)


def _prompt_mismatch(end: int) -> ProxyRequestError:
    return ProxyRequestError(
        f"prompt: does not start with the {end} tokens this episode has recorded; the recording proxy keeps one "
        "token sequence per episode: send the previous prompt and reply unchanged, then the new text",
        param="prompt", code="history_mismatch")
