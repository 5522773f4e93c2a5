import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_lab.engine.sampling import SamplingParams, _top_k, _top_p, make_penalties, make_sampler


def logprobs(values):
    x = mx.array([values], dtype=mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def test_greedy_is_argmax():
    lp = logprobs([0.1, 3.0, -1.0, 2.9])
    assert make_sampler(SamplingParams())(lp).item() == 1


@given(st.lists(st.floats(-20, 20, width=32), min_size=2, max_size=50), st.integers(0, 2**31 - 1))
@settings(max_examples=50, deadline=None)
def test_top_k_one_is_greedy(values, seed):
    lp = logprobs(values)
    token = make_sampler(SamplingParams(temperature=1.5, top_k=1, seed=seed))(lp).item()
    scaled = (lp / 1.5)[0].tolist()  # what the sampler ranks: ties (to float32 precision) may go either way
    assert scaled[token] == max(scaled)


def test_top_p_keeps_smallest_set_with_mass_p():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = _top_p(logits, 0.7)
    assert mx.isfinite(kept).tolist() == [[True, True, False, False]]
    # the most likely token always survives
    assert mx.isfinite(_top_p(logits, 1e-6)).tolist() == [[True, False, False, False]]


def test_top_k_masks_all_but_k():
    logits = mx.array([[1.0, 5.0, 3.0, 4.0]])
    assert mx.isfinite(_top_k(logits, 2)).tolist() == [[False, True, False, True]]


def test_same_seed_same_tokens_and_other_seed_differs():
    lp = logprobs([0.0] * 1000)
    draw = lambda seed: [make_sampler(SamplingParams(1.0, seed=seed))(lp).item() for _ in range(1)]  # noqa: E731
    s1 = make_sampler(SamplingParams(1.0, seed=7))
    s2 = make_sampler(SamplingParams(1.0, seed=7))
    a = [s1(lp).item() for _ in range(20)]
    b = [s2(lp).item() for _ in range(20)]
    assert a == b
    assert len(set(a)) > 1  # successive draws advance the key
    s3 = make_sampler(SamplingParams(1.0, seed=8))
    assert [s3(lp).item() for _ in range(20)] != a
    assert draw(1) == draw(1)


def test_sampling_follows_distribution():
    probs = [0.6, 0.3, 0.1]
    s = make_sampler(SamplingParams(1.0, seed=0))
    lp = mx.log(mx.array([probs]))
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[s(lp).item()] += 1
    for p, c in zip(probs, counts):
        assert abs(c / 2000 - p) < 0.05


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}])
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------- min-p, logit bias, penalties


def step(pen, token, logits):
    """One decode step of ``pen`` with input ``token``: the processed logits as a list."""
    return pen(mx.array([token]), mx.array([logits], mx.float32))[0].tolist()


def test_min_p_masks_tokens_below_the_fraction_of_the_top():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(1.0, min_p=0.35, seed=0)
    # 0.3 >= 0.35 * 0.5 stays, 0.15 < 0.175 goes: only tokens 0 and 1 are ever drawn
    sampler = make_sampler(params)
    drawn = {sampler(logits).item() for _ in range(300)}
    assert drawn == {0, 1}
    everything = make_sampler(SamplingParams(1.0, seed=0))
    assert {everything(logits).item() for _ in range(300)} == {0, 1, 2, 3}


def test_logit_bias_adds_to_the_logits_and_steers_greedy():
    params = SamplingParams(logit_bias={"3": 5.0, "0": -100})
    pen = make_penalties(params, [9, 9])
    out = step(pen, 9, [1.0, 2.0, 0.0, 0.0])
    assert out == [-99.0, 2.0, 0.0, 5.0]
    assert make_penalties(SamplingParams(), [1]) is None  # nothing to do: no processor at all


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    pen = make_penalties(SamplingParams(repetition_penalty=2.0), [0, 1])
    assert step(pen, 1, [4.0, -4.0, 4.0, -4.0]) == [2.0, -8.0, 4.0, -4.0]  # prompt tokens 0 and 1
    assert step(pen, 2, [4.0, -4.0, 4.0, -4.0]) == [2.0, -8.0, 2.0, -4.0]  # and now the generated 2
    windowed = make_penalties(SamplingParams(repetition_penalty=2.0, repetition_context=1), [0, 1])
    assert step(windowed, 1, [4.0, -4.0, 4.0, -4.0]) == [4.0, -8.0, 4.0, -4.0]  # only the latest token


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    pen = make_penalties(SamplingParams(presence_penalty=1.0, frequency_penalty=0.5), [2, 2, 0])
    base = [0.0, 0.0, 0.0, 0.0]
    assert step(pen, 0, base) == base  # the prompt's tokens are not penalised
    assert step(pen, 3, base) == [0.0, 0.0, 0.0, -1.5]  # 3 generated once: presence + frequency
    assert step(pen, 3, base) == [0.0, 0.0, 0.0, -2.0]  # twice: one more frequency step
    assert step(pen, 1, base) == [0.0, -1.5, 0.0, -2.0]


def test_penalties_change_what_greedy_picks():
    """With a repetition penalty the greedy choice moves off a token the prompt holds."""
    logits = [3.0, 2.0, 1.0]
    plain = make_sampler(SamplingParams())
    assert plain(mx.array([logits])).item() == 0
    pen = make_penalties(SamplingParams(repetition_penalty=2.0), [0, 0])
    assert plain(pen(mx.array([0]), mx.array([logits]))).item() == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 11.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("logit_bias", {"1": 101}),
        ("logit_bias", {"x": 1}),
        ("repetition_context", -1),
    ],
)
def test_out_of_range_sampling_fields_are_refused_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_round_trips_through_json_with_the_new_fields():
    import json

    params = SamplingParams(0.5, min_p=0.1, repetition_penalty=1.2, frequency_penalty=0.3, logit_bias={"7": -2.0})
    wire = json.loads(json.dumps(params.to_json()))
    assert SamplingParams(**wire) == params
    assert "presence_penalty" not in wire  # left at its default: not sent
