"""Syntax highlighting for the designer: userconfig.xml and the shell scripts.

Pygments does the lexing (the same lexers as `pygmentize`); this module only
maps its token types to Qt text formats. Lexing is per line, as
QSyntaxHighlighter works per block: a comment or heredoc spanning lines is
coloured line by line, which is enough for short module files.
"""

from __future__ import annotations

from pygments.lexer import Lexer
from pygments.lexers import BashLexer, XmlLexer
from pygments.token import Comment, Keyword, Name, Number, Operator, String, Token, _TokenType
from PySide6.QtGui import QColor, QFont, QSyntaxHighlighter, QTextCharFormat, QTextDocument

# Token type -> (colour, bold). The most specific matching type wins.
STYLE: dict[_TokenType, tuple[str, bool]] = {
    Comment: ("#6b7280", False),
    Comment.Preproc: ("#8a5cb8", False),
    Keyword: ("#8a1c7c", True),
    Name.Tag: ("#1f5fa8", True),
    Name.Attribute: ("#a35200", False),
    Name.Builtin: ("#0b7a75", False),
    Name.Variable: ("#0b7a75", False),
    String: ("#2e7d32", False),
    Number: ("#b42318", False),
    Operator: ("#5b6470", False),
}


def _format(colour: str, bold: bool) -> QTextCharFormat:
    fmt = QTextCharFormat()
    fmt.setForeground(QColor(colour))
    if bold:
        fmt.setFontWeight(QFont.Weight.Bold)
    return fmt


class PygmentsHighlighter(QSyntaxHighlighter):
    """Colours a QTextDocument with one pygments lexer."""

    def __init__(self, document: QTextDocument, lexer: Lexer) -> None:
        self._lexer = lexer
        self._formats = {token: _format(*style) for token, style in STYLE.items()}
        self._cache: dict[_TokenType, QTextCharFormat | None] = {}
        super().__init__(document)

    def format_for(self, token: _TokenType) -> QTextCharFormat | None:
        if token not in self._cache:
            found = None
            probe = token
            while probe is not Token and probe is not None:
                if probe in self._formats:
                    found = self._formats[probe]
                    break
                probe = probe.parent
            self._cache[token] = found
        return self._cache[token]

    def highlightBlock(self, text: str) -> None:
        position = 0
        for token, value in self._lexer.get_tokens(text):
            fmt = self.format_for(token)
            # The lexer sees the line with its newline (comments end there); clamp it off.
            length = min(len(value), len(text) - position)
            if fmt is not None and length > 0:
                self.setFormat(position, length, fmt)
            position += len(value)
            if position >= len(text):
                break


def xml_highlighter(document: QTextDocument) -> PygmentsHighlighter:
    return PygmentsHighlighter(document, XmlLexer(stripnl=False))


def shell_highlighter(document: QTextDocument) -> PygmentsHighlighter:
    return PygmentsHighlighter(document, BashLexer(stripnl=False))
