"""``memedit ui``: interactive rewriting of a generator in the browser.

Paint on generated images, copy an object, paste it elsewhere with a live preview, show
a few examples of the context where the new rule applies, press Execute, and look at new
samples that follow the rule; toggle, revert, save and replay edits. A local web app
(the optional extra ``memedit[ui]``, Flask) over memedit's rewriting workflow:

- :mod:`memedit.ui.state`: a session's state as a value, with pure operations.
- :mod:`memedit.ui.workflow`: every call into the workflow.
- :mod:`memedit.ui.workspace`: the generator, statistics and images sessions share.
- :mod:`memedit.ui.session`: one session behind a lock; long work as background jobs.
- :mod:`memedit.ui.jobs`: background jobs with progress.
- :mod:`memedit.ui.server`: the Flask app; the page is ``static/`` (HTML, CSS, JS; no
  build step, no network).
- :mod:`memedit.ui.command`: the ``memedit ui`` subcommand.

Importing this package does not import Flask; the subcommand says how to install it.
"""

from memedit.ui.command import add_subcommand

__all__ = ["add_subcommand"]
