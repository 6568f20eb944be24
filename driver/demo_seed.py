# The example from the Python "perf profiling" howto: baz -> bar -> foo.

def foo(n):
    result = 0
    for _ in range(n):
        result += 1
    return result


def bar(n):
    foo(n)


def baz(n):
    bar(n)


if __name__ == "__main__":
    baz(10_000_000)
