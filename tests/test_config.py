"""Estimator settings from one source of truth: CLI options and YAML keys come from the Param declarations."""

import inspect

import pytest
import yaml

from normdino.cli import build_parser, main
from normdino.config import declared_params
from normdino.detector import AnomalyDetector
from normdino.detector_params import DETECTOR_PARAMS
from normdino.methods import registry


def _print_config(capsys, *args):
    assert main(["fit", "x", "-o", "m.normdino", "--print-config", *args]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_declared_parameter_is_an_option_of_fit_and_bench():
    parser = build_parser(estimator_options=True)
    sub = parser._subparsers._group_actions[0].choices  # argparse keeps sub-parsers here
    for command in ("fit", "bench"):
        flags = {s for a in sub[command]._actions for s in a.option_strings}
        for name, (param, _) in declared_params().items():
            assert param.cli_flag in flags, (command, name)


def test_detector_params_match_its_constructor():
    signature = inspect.signature(AnomalyDetector.__init__).parameters
    for param in DETECTOR_PARAMS:
        assert param.name in signature


def test_print_config_round_trips_through_config(capsys, tmp_path):
    settings = _print_config(capsys, "--method", "patchcore-150", "--sigma", "2", "--seed", "7")
    assert settings["method"] == "patchcore-150" and settings["coreset_size"] == "150"
    assert settings["sigma"] == 2.0 and settings["seed"] == 7 and settings["fprs"] == [0.01, 0.05, 0.1]
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(settings))
    assert _print_config(capsys, "--config", str(path)) == settings


def test_command_line_beats_config_beats_defaults(capsys, tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text("method: dpmm\nn_components: 300\nepochs: 5\n")
    settings = _print_config(capsys, "--config", str(path), "--epochs", "9")
    assert settings["n_components"] == 300 and settings["epochs"] == 9
    assert settings["covariance_type"] == registry.create("dpmm").covariance_type


def test_config_errors_are_one_sentence(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("n_componentz: 3\n")
    assert main(["fit", "x", "-o", "m", "--config", str(path), "--print-config"]) == 1
    assert "unknown settings n_componentz" in capsys.readouterr().err
    path.write_text("a: [1, 2\n")
    assert main(["fit", "x", "-o", "m", "--config", str(path), "--print-config"]) == 1
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["fit", "x", "-o", "m", "--shots", "2", "--print-config"]) == 1
    assert "--shots is a setting of anomalydino, not of method dpmm" in capsys.readouterr().err


def test_bad_values_exit_2_or_1_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "x", "-o", "m", "--covariance", "weird"])
    assert exit_info.value.code == 2
    assert main(["fit", str(tmp_path), "-o", str(tmp_path / "m.normdino"), "--components", "0"]) == 1
    assert "n_components must be at least 1" in capsys.readouterr().err


def test_help_of_every_command_renders(capsys):
    for command in ("fit", "bench", "predict", "evaluate", "info"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--coreset-size" in capsys.readouterr().out


def test_each_method_brings_its_default_backbone(capsys):
    assert _print_config(capsys)["backbone"] == "dinov2_vits14"
    assert _print_config(capsys, "--method", "himatch")["backbone"] == "dinov3_vits16"
    assert _print_config(capsys, "--method", "himatch", "--backbone", "random")["backbone"] == "random"


def test_shared_forward_pass_extracts_the_last_block_once():
    from normdino.evaluation.protocol import feature_union, layer_positions

    methods = [registry.create("dpmm"), registry.create("himatch", layers=(3, 6, 9, 12))]
    assert feature_union(methods) == ((-1, 3, 6, 9, 12), True)
    layers, cls = feature_union(methods, depth=12)
    assert layers == (12, 3, 6, 9) and cls
    assert layer_positions(methods[0], layers, 12) == [0]
    assert layer_positions(methods[1], layers, 12) == [1, 2, 3, 0]


def test_a_cache_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    image = tmp_path / "a.png"
    __import__("PIL.Image", fromlist=["Image"]).new("L", (32, 32)).save(image)
    assert main(["fit", str(image), "-o", str(tmp_path / "m.normdino"), "--cache-dir", str(not_a_folder),
                 "--backbone", "/nonexistent/weights"]) == 1
    err = capsys.readouterr().err
    assert str(not_a_folder) in err and "Traceback" not in err and "weights" not in err


# --- issue 20: a preset name never silently overrides an explicit setting -------------------------------------
@pytest.mark.parametrize("args, sentence", [
    (["--method", "patchcore-150", "--coreset-size", "20"],
     "method patchcore-150 means --coreset-size 150, which conflicts with --coreset-size 20 on the command line; "
     "ask for method patchcore with --coreset-size 20 instead"),
    (["--method", "anomalydino-1shot", "--shots", "3"],
     "method anomalydino-1shot means --shots 1, which conflicts with --shots 3 on the command line"),
])
def test_a_preset_and_a_different_setting_on_the_command_line_are_refused(capsys, args, sentence):
    assert main(["fit", "x", "-o", "m.normdino", "--print-config", *args]) == 1
    err = capsys.readouterr().err
    assert sentence in err and "Traceback" not in err


def test_a_preset_and_a_different_setting_in_one_config_file_are_refused(capsys, tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text("method: anomalydino-1shot\nshots: 3\n")
    assert main(["fit", "x", "-o", "m.normdino", "--config", str(path), "--print-config"]) == 1
    assert "sets method: anomalydino-1shot, which means shots: 1, and also shots: 3" in capsys.readouterr().err


def test_the_command_line_beats_a_preset_of_the_config_file_and_the_other_way_round(capsys, tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text("method: patchcore-1024\n")
    settings = _print_config(capsys, "--config", str(path), "--coreset-size", "20")
    assert settings["method"] == "patchcore" and settings["coreset_size"] == "20"  # the name says what is fitted
    path.write_text("method: anomalydino-1shot\n")
    settings = _print_config(capsys, "--config", str(path), "--shots", "3")
    assert settings["method"] == "anomalydino" and settings["shots"] == 3
    path.write_text("method: patchcore\ncoreset_size: 20\n")
    settings = _print_config(capsys, "--config", str(path), "--method", "patchcore-150")
    assert settings["method"] == "patchcore-150" and settings["coreset_size"] == "150"
    path.write_text("method: patchcore-1024\ncoreset_size: 1024\n")  # the same value twice is no conflict
    assert _print_config(capsys, "--config", str(path))["coreset_size"] == "1024"


def test_the_library_refuses_a_preset_with_a_different_explicit_setting():
    from normdino.errors import InputError

    with pytest.raises(InputError, match="method patchcore-150 means coreset_size=150, which conflicts"):
        registry.create("patchcore-150", coreset_size="20")
    with pytest.raises(InputError, match="method anomalydino-1shot means shots=1"):
        AnomalyDetector(method="anomalydino-1shot", shots=3)._build_method()
    assert registry.create("patchcore-150", coreset_size=150).coreset_size == "150"
    assert registry.create("dpmm-likelihood", score=None).score == "likelihood"


def test_bench_gives_each_preset_its_own_settings():
    from normdino.cli.options import estimator_settings as _estimator_settings

    args = build_parser(estimator_options=True).parse_args(["bench", "--methods", "dpmm,dpmm-likelihood", "data"])
    assert _estimator_settings(args, method="dpmm")[2]["score"] == "cosine"
    assert _estimator_settings(args, method="dpmm-likelihood")[2]["score"] == "likelihood"


def test_fit_with_a_config_preset_and_a_command_line_coreset_size_fits_that_size(tmp_path, tiny_dinov2_dir):
    """The reviewer's case: --config with method: patchcore-1024, then --coreset-size 20: 20 prototypes."""
    from normdino.io.phantoms import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", n_train=4, n_valid=2, n_test_normal=0, n_test_anomalous=0,
                                 size=32, seed=3)
    path = tmp_path / "fit.yaml"
    path.write_text("method: patchcore-1024\n")
    out = tmp_path / "m.normdino"
    assert main(["fit", str(data / "train" / "good"), "-o", str(out), "--config", str(path), "--coreset-size", "20",
                 "--backbone", str(tiny_dinov2_dir), "--image-size", "56", "--no-cache", "--quiet"]) == 0
    detector = AnomalyDetector.load(out, progress=False)
    assert detector.method_.name == "patchcore" and detector.method_.coreset_size == "20"
    assert detector.method_.n_prototypes == 20
