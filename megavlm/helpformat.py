"""The ``--help`` formatter of every tool: the description as written, and every option's default.

argparse's ArgumentDefaultsHelpFormatter shows a default only for options that have a help
text and prints ``(default: None)`` for options that have none; users asked for the defaults of
every tool. This formatter keeps the module docstrings' layout (RawDescription) and appends
``(default: X)`` to every option whose default is a value (not None, not a False flag).
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and self._shows_default(action):
            action.help = "(default: %(default)s)"  # an option without help: its default alone
        return super()._format_action(action)

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        d = action.default
        return d is not None and d is not False and d is not argparse.SUPPRESS and d != [] \
            and action.option_strings != [] and not isinstance(action, argparse._HelpAction)

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        if self._shows_default(action) and "%(default)" not in (action.help or "") and "default" not in text:
            text = f"{text} (default: {action.default})".strip()
        return text
