"""Expert (gold) trajectories in token space, for off-policy supervision.

The gold conversation is rendered once with the chat template; each assistant turn's tokens are
cut out of that rendering (from after the generation prompt through the end-of-turn token), so
they are exactly what the template produces for the assistant message: what a model would have
to generate. The trajectory is the whole rendering, token for token.
"""
from __future__ import annotations

from fastrl.data.chat_template import TemplateNotPrefixStableError, end_of_turn_id, render_messages
from fastrl.data.trajectory import Trajectory


def expert_trajectory(env, task, tokenizer, *, hint: bool = False, score: bool = True
                      ) -> Trajectory:
    """The env's gold conversation (`env.gold_messages(task)`) as a Trajectory with
    is_expert=True. With `score`, the gold turns are replayed through the env (decoded from the
    assistant tokens, as a rollout would be) and the trajectory gets the env's reward, so it can
    share a group's advantage normalisation."""
    task_id = str(getattr(task, "id", task))
    messages = env.gold_messages(task, hint=hint)
    tools = env.reset(task, hint=hint).tools
    eot = end_of_turn_id(tokenizer)
    full = render_messages(tokenizer, messages, tools, False)
    traj = Trajectory(task_id=task_id, is_expert=True)
    cursor = 0
    turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise ValueError(f"task {task_id}: the gold conversation has no assistant turn")
    # One rendering per assistant turn (the history plus the generation prompt), not two: the
    # turn runs from there to the first end-of-turn token of the whole rendering, and the next
    # turn's prefix check confirms that the whole rendering holds this turn as its history.
    for k in turns:
        prefix = render_messages(tokenizer, messages[:k], tools, True)
        start = len(prefix)
        if full[:start] != prefix or start < cursor:
            raise TemplateNotPrefixStableError(
                f"task {task_id}: the rendering of the gold conversation up to message {k} (with "
                "the generation prompt) is not a prefix of the whole rendering; token-space "
                "trajectories need a prefix-stable chat template")
        end = next((i + 1 for i in range(start, len(full)) if full[i] == eot), None)
        if end is None:
            raise ValueError(f"task {task_id}: the template rendered no end-of-turn token for "
                             f"gold message {k}")
        if start > cursor:
            (traj.add_prompt if cursor == 0 else traj.add_observation)(full[cursor:start])
        traj.add_assistant(full[start:end])
        cursor = end
    if cursor < len(full):
        traj.add_observation(full[cursor:])
    if score:
        state = env.reset(task, hint=hint)
        for (a, b) in traj.assistant_spans():
            if state.done:
                raise ValueError(f"task {task_id}: the env ended the gold episode before its "
                                 "last assistant turn")
            env.step(state, tokenizer.decode(full[a:b], skip_special_tokens=False))
        info = env.reward(state)
        traj.reward = float(info.get("total", 0.0))
        traj.format_error = not all(t.format_ok for t in state.turns)
    return traj
