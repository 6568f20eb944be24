def gen(n):
    for i in range(n):
        yield i


def evens(items):
    for i in items:
        if i % 2 == 0:
            yield i


def run():
    sum(evens(gen(3_000_000)))
