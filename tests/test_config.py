import pytest

from chatapp.core import config
from chatapp.core.config import ParameterError, validate_generation


def test_defaults_are_valid():
    params = validate_generation()
    assert params.temperature == config.DEFAULT_TEMPERATURE and params.seed is None


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 1.5), ("top_k", 10_000), ("top_p", 0), ("top_p", 1.1),
    ("max_new_tokens", 0), ("max_new_tokens", 100_000), ("repetition_penalty", 0.5), ("seed", -1),
    ("seed", 2**40), ("temperature", None), ("top_k", True),
])
def test_out_of_range_values_get_a_clear_error(field, value):
    with pytest.raises(ParameterError) as info:
        validate_generation(**{field: value})
    message = str(info.value)
    assert field in message and "between" in message


def test_greedy_passes_no_sampling_arguments():
    assert config.sampling_kwargs(validate_generation(temperature=0, top_k=5)) == {
        "max_new_tokens": config.DEFAULT_MAX_NEW_TOKENS, "do_sample": False}
    sampled = config.sampling_kwargs(validate_generation(temperature=0.5, top_k=0, top_p=0.9))
    assert sampled["do_sample"] and sampled["top_k"] == 0 and sampled["top_p"] == 0.9


def test_data_dir_and_model_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATAPP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CHATAPP_MODEL", "demo")
    assert config.data_dir() == tmp_path.resolve()
    assert config.requested_model() == "demo"
    assert config.requested_model("other") == "other"
