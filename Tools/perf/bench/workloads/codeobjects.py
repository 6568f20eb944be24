SOURCE = "\n".join(f"def f{i}(a, b):\n    return a + b * {i}\n"
                   for i in range(5000))


def run():
    namespace = {}
    exec(compile(SOURCE, "<codeobjects>", "exec"), namespace)
    for i in range(5000):
        namespace[f"f{i}"](i, 2)
