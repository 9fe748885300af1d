import pytest

from trainables.settings import SettingsError, TrialSettings, load_trial_settings


def test_defaults_live_in_the_schema():
    s = load_trial_settings()
    assert s.model.quantization == "4bit" and s.model.trust_remote_code is False
    assert s.lora.alpha == s.lora.r * s.lora.alpha_per_rank


def test_unknown_key_names_the_known_ones():
    with pytest.raises(SettingsError) as e:
        load_trial_settings({"lora.rank": 8})
    msg = str(e.value)
    assert "lora.rank" in msg and "unknown key" in msg and "alpha_per_rank" in msg and "\n" not in msg


def test_out_of_range_names_field_and_limit():
    with pytest.raises(SettingsError, match=r"lora\.r: .*greater than 0.*got 0"):
        load_trial_settings({"lora.r": 0})
    with pytest.raises(SettingsError, match=r"model\.quantization: .*'4bit' or 'none'.*got '8bit'"):
        load_trial_settings({"model.quantization": "8bit"})
    with pytest.raises(SettingsError, match=r"oversample_minority.*less than 1"):
        load_trial_settings({"data.oversample_minority": 1.5})


def test_with_values_revalidates():
    s = TrialSettings()
    assert s.with_values({"lora.r": 4}).lora.r == 4
    with pytest.raises(SettingsError):
        s.with_values({"optim.learning_rate": -1})
