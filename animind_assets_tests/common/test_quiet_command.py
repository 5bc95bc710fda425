"""``quiet_command``: benchmark commands hold the libraries' chatter back, as ``animind demo`` does."""

from __future__ import annotations

import logging
import warnings

import pytest

from animind_assets.quiet import quiet_command


def test_library_warnings_and_logs_are_held_back_and_written(tmp_path, capsys):
    target = tmp_path / "out" / "library-warnings.txt"
    before = logging.getLogger("transformers").level
    with quiet_command(False, target):
        print("result line")
        warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=1)
        logging.getLogger("transformers").warning("chatter from transformers")
        with quiet_command(False, tmp_path / "inner.txt"):  # a command calling another command's main
            warnings.warn("inner warning", UserWarning, stacklevel=1)
    out, err = capsys.readouterr()
    assert "result line" in out
    assert "deprecated" not in err and "chatter from transformers" not in err and "inner warning" not in err
    assert "2 library warning(s) held back" in out and str(target) in out
    text = target.read_text(encoding="utf-8")
    assert "past_key_values" in text and "inner warning" in text
    assert not (tmp_path / "inner.txt").exists()  # the outer block owns the file
    assert logging.getLogger("transformers").level == before  # restored on exit


def test_verbose_leaves_warnings_alone_and_writes_nothing(tmp_path):
    target = tmp_path / "library-warnings.txt"
    with pytest.warns(FutureWarning, match="shown as it comes"), quiet_command(True, target):
        warnings.warn("shown as it comes", FutureWarning, stacklevel=1)
    assert not target.exists()


def test_no_warnings_no_file_no_line(tmp_path, capsys):
    target = tmp_path / "library-warnings.txt"
    with quiet_command(False, target):
        print("only this")
    assert capsys.readouterr().out.strip() == "only this" and not target.exists()


def test_dagster_event_lines_only_with_verbose(capfd):
    """``dagster_console_run_config``: an in-process ``dg.materialize`` (as ``benchmarks.finetune_mal`` and
    ``benchmarks.tiger_beauty`` run the assets) prints none of Dagster's DEBUG event lines unless verbose."""
    import dagster as dg

    from animind_assets.quiet import dagster_console_run_config

    @dg.asset
    def tiny() -> int:
        return 1

    capfd.readouterr()
    assert dg.materialize([tiny], run_config=dagster_console_run_config(False)).success
    quiet = "".join(capfd.readouterr())
    assert dg.materialize([tiny], run_config=dagster_console_run_config(True)).success
    loud = "".join(capfd.readouterr())
    assert "STEP_START" not in quiet and "RUN_SUCCESS" not in quiet
    assert "STEP_START" in loud or "RUN_SUCCESS" in loud


def test_bars_of_a_tqdm_imported_before_the_command_are_silenced_then_restored(tmp_path):
    """tqdm reads TQDM_DISABLE only at import: a tqdm already imported (here, by pytest's plugins or this line)
    still draws no bar inside quiet_command (the GGUF "Converting and de-quantizing" bar once did), and draws again
    after it; with verbose it is left alone."""
    import io

    import tqdm.auto

    def bar_text() -> str:
        buf = io.StringIO()
        for _ in tqdm.auto.tqdm(range(3), desc="Converting", file=buf, disable=False):
            pass
        return buf.getvalue()

    with quiet_command(False, tmp_path / "w.txt"):
        assert bar_text() == ""
    assert "Converting" in bar_text()
    with quiet_command(True, tmp_path / "w.txt"):
        assert "Converting" in bar_text()
