"""Facts files as users write them (spreadsheets' CSVs, hand-written JSON), read without a
model: the reader's results, its messages (file, line, expected vs received), the checks
`memedit lm-edit` makes before any work, and its --out folder."""

from __future__ import annotations

import argparse
import os

import pytest

from memedit.lm.cli import add_subcommands
from memedit.lm.prompts import Request, check_fact_tokens, read_facts

HEADER = "subject,prompt,target_new,target_true\n"


def _write(tmp_path, name: str, data) -> str:
  path = tmp_path / name
  if isinstance(data, str):
    data = data.encode("utf-8")
  path.write_bytes(data)
  return str(path)


def _read(tmp_path, data, name="facts.csv"):
  return read_facts(_write(tmp_path, name, data))


def _tokenizer(vocab):
  index = {w: i + 1 for i, w in enumerate(vocab)}

  def tokenize(text):
    out = []
    for w in text.split():
      if w not in index:
        raise ValueError(f"tokenize: expected words of the vocabulary, got {w!r}")
      out.append(index[w])
    return out

  return tokenize


def test_spreadsheet_csv_with_bom_crlf_quotes_and_blank_lines(tmp_path):
  text = ("\ufeffSubject, Prompt ,target_new,target_true\r\n"
          "\r\n"
          '"Reskin, Tavo","the home of {}, they say", paris , rome\r\n'
          ",,,\r\n"
          'Ana Bel,"the town\r\nof {}",lyon,\r\n')
  facts = _read(tmp_path, text)
  assert facts == [Request("the home of {}, they say", "Reskin, Tavo", "paris", "rome"),
                   Request("the town\r\nof {}", "Ana Bel", "lyon", None)]
  # The same facts as JSON with a byte-order mark.
  json_text = ('\ufeff[{"subject": "Ana Bel", "prompt": "the town of {}", '
               '"target_new": " lyon", "target_true": null}]')
  assert _read(tmp_path, json_text, "facts.json") == [
      Request("the town of {}", "Ana Bel", "lyon", None)]


def test_targets_lose_surrounding_spaces_but_not_their_inner_ones(tmp_path):
  (r,) = _read(tmp_path, HEADER + " Tavo Reskin ,{} lives in, new york ,  old town \n")
  assert (r.subject, r.target_new, r.target_true) == ("Tavo Reskin", "new york", "old town")


@pytest.mark.parametrize("text, match", [
    ("Tavo,{} lives in,paris\n", r"facts.csv: line 1: expected a header line naming the "
     r"columns subject, prompt, target_new .* got \['Tavo', '\{\} lives in', 'paris'\]"),
    ("", "facts.csv: expected a header line .* got an empty file"),
    ("\n \n", "facts.csv: expected a header line .* got blank lines only"),
    ("subject;prompt;target_new\nA;{} x;y\n", r"line 1: expected a header line .* got "
     r"\['subject;prompt;target_new'\]"),
    ("subject,prompt,target_new,target_new\nA,{} x,y,z\n",
     r"line 1: expected a header line .*each once, got .*repeated \['target_new'\]"),
    ("subject,prompt,target_new,notes\nA,{} x,y,z\n",
     r"line 1: expected a header line .*unknown \['notes'\]"),
    (HEADER + "A,{} x,y,z,EXTRA\n", r"line 2: expected at most 4 fields \(the header's "
     r"\['subject', 'prompt', 'target_new', 'target_true'\]\), got 5"),
    (HEADER + "\nA,{} x\n", r"line 3: expected the fields subject, prompt, target_new .*got "
     r"missing \['target_new'\]"),
    (HEADER + 'A,{} x,y\n"B,{} x,y\n', r"line 3: expected CSV \(quotes around a field .*"
     "unexpected end of data"),
    (HEADER + 'A,"{} x\ny",\n', r"lines 2-3: expected the fields .*missing \['target_new'\]"),
    (HEADER + "A,{} x,  ,z\n", r"line 2: target_new: expected a non-empty string, got '  '"),
    (HEADER + "A,{} x,y,y\n", "line 2: expected a target_new other than target_true, got "
     "'y' for both"),
    (HEADER + "Tavo,Tavo lives in,paris\n", r"line 2: prompt: expected a template with "
     r"exactly one '\{\}' for the subject, got 'Tavo lives in' \(write \{\} where the "
     "subject goes"),
    (HEADER + "A,{} x,y\nB,{} x,y\n A ,{} x, y\n", r"line 4: expected each \(subject, prompt\)"
     r" once, got 'A x' again \(first at line 2\) with the same target_new"),
    (HEADER + "A,{} x,y\nA,{} x,w\n", r"line 3: expected each \(subject, prompt\) once, got "
     r"'A x' again \(first at line 2\) with another target_new: 'y' there, 'w' here"),
])
def test_bad_csv_names_file_line_and_what_was_expected(tmp_path, text, match):
  with pytest.raises(ValueError, match=match) as info:
    _read(tmp_path, text)
  assert str(tmp_path / "facts.csv") in str(info.value)


@pytest.mark.parametrize("data, match", [
    ("subject,prompt,target_new\nZo\xeb,{} x,y\n".encode("latin-1"),
     r"facts.csv: line 2: expected UTF-8 text, got the byte b'\\xeb'"),
    ("subject,prompt,target_new\n".encode("utf-16"),
     r"facts.csv: line 1: expected UTF-8 text, got the byte b'\\xff'"),
])
def test_file_that_is_not_utf8_is_refused_with_its_line(tmp_path, data, match):
  with pytest.raises(ValueError, match=match):
    _read(tmp_path, data)


@pytest.mark.parametrize("value, match", [
    ("false", "fact 1: target_true: expected None or a non-empty string, got False"),
    ("0", "fact 1: target_true: expected None or a non-empty string, got 0"),
])
def test_json_target_true_that_is_no_string_is_refused(tmp_path, value, match):
  text = ('[{"subject": "A", "prompt": "{} x", "target_new": "y"}, '
          f'{{"subject": "B", "prompt": "{{}} x", "target_new": "y", "target_true": {value}}}]')
  with pytest.raises(ValueError, match=match):
    _read(tmp_path, text, "facts.json")


def test_folder_is_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match="expected a facts file, got a folder"):
    read_facts(tmp_path)


def test_fact_tokens_checked_against_tokenizer_contexts_and_length():
  tok = _tokenizer("it is a the home of Tavo Reskin paris rome new york .".split())
  contexts = ("{}", "it is a . {}")
  check_fact_tokens(tok, Request("the home of {}", "Tavo Reskin", "new york", "rome"),
                    contexts, max_length=10)  # 9 prompt tokens in the longer context + "new"
  with pytest.raises(ValueError, match="fit the model's 9 positions, got 10 tokens"):
    check_fact_tokens(tok, Request("the home of {}", "Tavo Reskin", "new york"), contexts,
                      max_length=9)
  with pytest.raises(ValueError, match="target_true 'lyon' after 'the home of Tavo Reskin': "
                                       "tokenize: expected words of the vocabulary, got 'lyon'"):
    check_fact_tokens(tok, Request("the home of {}", "Tavo Reskin", "paris", "lyon"), contexts)
  with pytest.raises(ValueError, match="got 'Zoë'"):
    check_fact_tokens(tok, Request("the home of {}", "Zoë", "paris"), contexts)


def _run(*argv) -> int:
  parser = argparse.ArgumentParser(prog="memedit")
  add_subcommands(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args([str(a) for a in argv])
  return args.run(args)


def test_lm_edit_refuses_edits_of_an_earlier_run_it_would_leave_behind(tmp_path, monkeypatch):
  """A second run with fewer facts into the same --out would leave the first run's edit-1
  beside its own edit-0; refused before any work (the model is never opened)."""
  import memedit.lm.cli as cli

  def no_model(args):
    raise AssertionError("the model was opened")

  monkeypatch.setattr(cli, "_open", no_model)
  out = tmp_path / "edits with spaces"
  for i in (0, 1, 3):
    (out / f"edit-{i}").mkdir(parents=True)
  (out / "edit-3" / "mine.txt").write_text("kept")
  facts = _write(tmp_path, "facts.csv", HEADER + "A,{} x,y,z\n")
  with pytest.raises(ValueError, match=r"--out: expected a folder this run's 1 edit\(s\) "
                                       r"\(edit-0 \.\. edit-0\) fill, got .*which also holds "
                                       "edit-1, edit-3 from an earlier run"):
    _run("lm-edit", "--facts", facts, "--out", out)
  assert (out / "edit-3" / "mine.txt").read_text() == "kept"
  assert sorted(os.listdir(out)) == ["edit-0", "edit-1", "edit-3"]
  # A bad facts file is refused before the model is opened, naming the file and line.
  bad = _write(tmp_path, "bad facts.csv", HEADER + "A,{} x,y,z\nB,{} x,y,y\n")
  with pytest.raises(ValueError, match="bad facts.csv: line 3: expected a target_new other"):
    _run("lm-edit", "--facts", bad, "--out", tmp_path / "new")
  assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_text("my notes"), "expected a new file or a PNG image to replace, "
     "got .*trace_mlp_average.png', an existing file of 8 bytes that is not one"),
    (lambda p: p.mkdir(), "expected a file to write, got the folder "
     ".*trace_mlp_average.png'"),
])
def test_lm_trace_refuses_to_replace_a_non_png_before_any_work(tmp_path, monkeypatch, make,
                                                               match):
  import memedit.lm.cli as cli

  def no_model(args):
    raise AssertionError("the model was opened")

  monkeypatch.setattr(cli, "_open", no_model)
  out = tmp_path / "maps"
  out.mkdir()
  make(out / "trace_mlp_average.png")
  with pytest.raises(ValueError, match=f"--out: {match}"):
    _run("lm-trace", "--kind", "mlp", "--out", out)
  assert sorted(os.listdir(out)) == ["trace_mlp_average.png"]


def test_lm_help_describes_every_command_and_option_and_facts_counts_refuse_a_file(capsys):
  """Every lm-* subcommand has a description and every option a help text; the --facts
  counts of lm-trace / lm-eval / lm-demo say they are no file, and a file name given
  there is refused by argparse naming the count it expects."""
  parser = argparse.ArgumentParser(prog="memedit")
  sub = parser.add_subparsers(dest="command", required=True)
  add_subcommands(sub)
  names = ("lm-train", "lm-stats", "lm-edit", "lm-eval", "lm-trace", "lm-demo")
  assert sorted(sub.choices) == sorted(names)
  shown = {a.dest: a.help for a in sub._choices_actions}
  for name in names:
    p = sub.choices[name]
    assert shown.get(name), f"{name}: no one-line help in `memedit --help`"
    assert p.description and len(p.description.strip()) > 80, f"{name}: no description"
    for action in p._actions:
      if isinstance(action, argparse._HelpAction):
        continue
      assert action.help and action.help.strip(), f"{name} {action.option_strings}: no help"
    p.format_help()  # every %(default)s expands
    if name in ("lm-eval", "lm-trace", "lm-demo"):
      (facts,) = [a for a in p._actions if "--facts" in a.option_strings]
      assert "number of world facts" in facts.help and "not a file" in facts.help
  for name in ("lm-trace", "lm-eval"):
    with pytest.raises(SystemExit) as info:
      _run(name, "--facts", "facts.csv")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --facts: expected a count of world facts (a positive integer), got " \
           "'facts.csv'" in err and "lm-edit's --facts is a facts file" in err
  with pytest.raises(SystemExit):
    _run("lm-eval", "--single", "-1")
  assert "argument --single: expected an integer in [0, 10000000], got -1" in \
      capsys.readouterr().err
  with pytest.raises(SystemExit):  # a negative count trained on all but the last subjects
    _run("lm-train", "--warm-subjects", "-5")
  assert "argument --warm-subjects: expected an integer in [0, 10000000], got -5" in \
      capsys.readouterr().err


def test_lm_demo_with_a_model_does_not_train_another(tmp_path, monkeypatch):
  """`lm-demo --model M` traces and evaluates M; it trained the default-settings model
  first (minutes of work for a model it then did not use)."""
  import memedit.lm.cli as cli

  calls = []

  def step(name):
    def run(args):
      calls.append((name, args.model))
      return 0
    return run

  for name in ("train", "trace", "eval"):
    monkeypatch.setattr(cli, f"_run_{name}", step(name))
  assert _run("lm-demo", "--model", tmp_path / "m", "--out", tmp_path / "out") == 0
  assert calls == [("trace", str(tmp_path / "m")), ("eval", str(tmp_path / "m"))]
  calls.clear()
  assert _run("lm-demo", "--out", tmp_path / "out") == 0
  assert [c[0] for c in calls] == ["train", "trace", "eval"]
