"""The worker job: one dataclass built by the coordinator and read back by every rank."""

from __future__ import annotations

import json

import pytest

from exo_lab.engine.guided import json_object
from exo_lab.engine.job import Job, JobError
from exo_lab.engine.sampling import SamplingParams


def full_job() -> Job:
    return Job(7, (1, 2, 3), 16, SamplingParams(0.7, 0.9, 40, 123), ("\n\n", "END"), True, json_object().to_json(), 5)


def test_round_trip_through_json_text():
    job = full_job()
    wire = json.loads(json.dumps(job.to_json()))
    assert Job.from_json(wire) == job
    assert wire["sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 123}


def test_optional_fields_may_be_absent():
    job = Job.from_json({"seq": 1, "prompt": [5], "max_tokens": 1})
    assert job == Job(1, (5,), 1)
    assert job.sampling.greedy and job.stop == () and job.grammar is None and job.logprobs is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq": 0}, "positive integer seq"),
        ({"seq": "1"}, "positive integer seq"),
        ({"seq": True}, "positive integer seq"),
        ({"prompt": []}, "non-empty list of token ids"),
        ({"prompt": [1, -2]}, "non-empty list of token ids"),
        ({"prompt": "hello"}, "non-empty list of token ids"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": 2.5}, "max_tokens must be a positive integer"),
        ({"stop": "x"}, "stop must be a list of strings"),
        ({"stop": [1]}, "stop must be a list of strings"),
        ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
        ({"grammar": {"type": "object"}}, "constraint object"),
        ({"grammar": '%llguidance {}\nstart: "a"'}, "constraint object"),
        ({"logprobs": 21}, "from 0 to 20"),
        ({"sampling": {"temperature": -1}}, "bad sampling parameters: temperature"),
        ({"sampling": {"temprature": 1}}, "bad sampling parameters"),
        ({"sampling": [0.5]}, "sampling must be an object"),
    ],
)
def test_a_malformed_job_is_a_clear_error(change, message):
    wire = {**full_job().to_json(), **change}
    with pytest.raises(JobError, match=message):
        Job.from_json(wire)


def test_not_an_object():
    with pytest.raises(JobError, match="a job is a JSON object"):
        Job.from_json([1, 2, 3])


def test_the_coordinator_cannot_build_a_bad_job_either():
    with pytest.raises(JobError, match="max_tokens"):
        Job(1, (1,), 0)
    assert issubclass(JobError, ValueError)
