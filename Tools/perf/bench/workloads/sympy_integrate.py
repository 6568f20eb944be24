# sympy integrates and simplifies symbolic expressions.  Its cache is
# emptied first: every run does the same work.
from debian import use

sympy = use("sympy")
from sympy.core.cache import clear_cache  # noqa: E402

x = sympy.Symbol("x")
EXPRESSIONS = [x**2 * sympy.sin(x) * sympy.exp(x), sympy.log(x)**2 * x]


def run():
    clear_cache()
    for expr in EXPRESSIONS:
        sympy.simplify(sympy.diff(sympy.integrate(expr, x), x) - expr)
