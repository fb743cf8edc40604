"""The study's prompt text: ChatGLM-6B's chat format, rounds numbered from 0.

    [Round 0]\n问：{q0}\n答：{a0}\n[Round 1]\n问：{query}\n答：
A record without history is the bare query. `source_prefix` goes in front of everything.
"""


def build_prompt(query: str, history: list, source_prefix: str = "") -> str:
    if not history:
        return source_prefix + query
    text = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return source_prefix + text + f"[Round {len(history)}]\n问：{query}\n答："
