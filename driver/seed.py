# The howto's example, as the demo and make check-deb profile it: baz calls
# bar calls foo, a hot loop.  (Lib/test/test_perf_profiler.py profiles the
# same program as SEED; tests/test_driver.py checks that they agree.)

def foo(n):
    result = 0
    for _ in range(n):
        result += 1
    return result

def bar(n):
    foo(n)

def baz(n):
    bar(n)

baz(3_000_000)
