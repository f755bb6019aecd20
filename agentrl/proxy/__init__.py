"""The recording OpenAI proxy: agents written with any OpenAI-speaking framework train without rewriting.

Each running episode gets ``ctx.openai_base_url`` and ``ctx.openai_api_key`` (:class:`OpenAIProxy`, one per
worker); every call made there is generated through the episode's context and recorded into its trajectory,
token for token (:mod:`agentrl.proxy.recorder`), as long as each request extends the conversation recorded so
far (:mod:`agentrl.proxy.conversation`).
"""

from agentrl.proxy.conversation import Plan, normalize_messages, plan
from agentrl.proxy.recorder import EpisodeRecorder
from agentrl.proxy.replies import assistant_message
from agentrl.proxy.server import OpenAIProxy

__all__ = ["EpisodeRecorder", "OpenAIProxy", "Plan", "assistant_message", "normalize_messages", "plan"]
