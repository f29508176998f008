"""The rule both services use to resume a row's kept session (pure logic, no engine)."""
from services.model_service import MAX_SESSION_OUTPUTS, session_continues


def test_a_session_continues_only_on_a_longer_prefix_of_its_context_within_the_logprob_cap():
    context = [5, 6, 7]
    assert session_continues(context, 10, [5, 6, 7, 8], logprobs=20)
    assert not session_continues(context, 10, [5, 6, 7], logprobs=20)  # nothing new to send
    assert not session_continues(context, 10, [5, 6, 9, 8], logprobs=20)  # a draft cut short, then rewritten
    assert not session_continues(context, 10, [5, 6], logprobs=20)
    last_turn = MAX_SESSION_OUTPUTS // 21  # vLLM keeps 21 entries per returned token at logprobs=20
    assert session_continues(context, last_turn - 1, [5, 6, 7, 8], logprobs=20)
    assert not session_continues(context, last_turn + 1, [5, 6, 7, 8], logprobs=20)
