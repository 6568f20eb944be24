# sympy integrates symbolic expressions and checks the results by
# differentiating them.  Its cache is emptied first: every run does the
# same work.
from debian import use

sympy = use("sympy")
from sympy.core.cache import clear_cache  # noqa: E402

x = sympy.Symbol("x")
EXPRESSIONS = [1 / (x**3 + 1), x**3 * sympy.log(x),
               sympy.sin(x)**2 * sympy.cos(x)]


def run():
    clear_cache()
    for expr in EXPRESSIONS:
        sympy.simplify(sympy.diff(sympy.integrate(expr, x), x) - expr)
