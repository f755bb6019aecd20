"""Exact, safe evaluation of small arithmetic expressions (no ``eval``).

``evaluate("12*(3+4)/5")`` returns ``Fraction(84, 5)``. Supported: integers,
decimals (exact), ``+ - * / // % **``, parentheses, unary signs, ``sqrt``/``abs``
(``sqrt`` of a non-square gives a float), ``pi``/``e`` (floats) and, with
``variables``, single-letter names. Anything else — attribute access, calls to
other functions, huge powers — raises :class:`ExpressionError` with a message
saying what was refused, so a tool can show it to the model.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from fractions import Fraction

__all__ = ["ExpressionError", "Number", "evaluate", "format_number"]

Number = Fraction | float
MAX_CHARS = 500
MAX_EXPONENT = 512
MAX_DIGITS = 2000


class ExpressionError(ValueError):
    """The expression is not valid or not allowed."""


_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}


def evaluate(expr: str, variables: Mapping[str, Number] | None = None) -> Number:
    """Evaluate ``expr`` exactly (Fractions) where possible; raises ExpressionError on bad input."""
    if len(expr) > MAX_CHARS:
        raise ExpressionError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"invalid expression {expr!r}: {exc.msg}") from None
    try:
        return _eval(tree.body, variables or {})
    except ZeroDivisionError:
        raise ExpressionError("division by zero") from None
    except (OverflowError, ValueError) as exc:
        if isinstance(exc, ExpressionError):
            raise
        raise ExpressionError(str(exc)) from None


def _eval(node: ast.AST, env: Mapping[str, Number]) -> Number:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))  # str() keeps decimals exact: 0.1 -> 1/10
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        v = _eval(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ExpressionError(f"unknown name {node.id!r}")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1 and not node.keywords:
        return _call(node.func.id, _eval(node.args[0], env))
    raise ExpressionError(f"unsupported syntax: {type(node).__name__}")


def _binop(op: ast.operator, a: Number, b: Number) -> Number:
    if isinstance(op, ast.Add):
        r: Number = a + b
    elif isinstance(op, ast.Sub):
        r = a - b
    elif isinstance(op, ast.Mult):
        r = a * b
    elif isinstance(op, ast.Div):
        r = a / b
    elif isinstance(op, ast.FloorDiv):
        r = Fraction(a // b)
    elif isinstance(op, ast.Mod):
        r = a % b
    elif isinstance(op, ast.Pow):
        r = _pow(a, b)
    else:
        raise ExpressionError(f"unsupported operator {type(op).__name__}")
    if isinstance(r, Fraction) and max(len(str(r.numerator)), len(str(r.denominator))) > MAX_DIGITS:
        raise ExpressionError(f"result has more than {MAX_DIGITS} digits")
    return r


def _pow(a: Number, b: Number) -> Number:
    if isinstance(b, Fraction) and b.denominator == 1:
        if abs(b) > MAX_EXPONENT:
            raise ExpressionError(f"exponent {b} larger than {MAX_EXPONENT}")
        return a**b.numerator
    return float(a) ** float(b)


def _call(name: str, x: Number) -> Number:
    if name == "abs":
        return -x if x < 0 else x
    if name == "sqrt":
        if x < 0:
            raise ExpressionError("sqrt of a negative number")
        if isinstance(x, Fraction):
            n, d = math.isqrt(x.numerator), math.isqrt(x.denominator)
            if n * n == x.numerator and d * d == x.denominator:
                return Fraction(n, d)
        return math.sqrt(x)
    raise ExpressionError(f"unknown function {name!r} (allowed: sqrt, abs)")


def format_number(x: Number) -> str:
    """``84``, ``-3/4``, or a float with 12 significant digits."""
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    return f"{x:.12g}"
