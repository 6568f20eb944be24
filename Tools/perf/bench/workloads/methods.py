class Point:
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        self.x = x
        self.y = y

    def add(self, other):
        return Point(self.x + other.x, self.y + other.y)

    def norm2(self):
        return self.x * self.x + self.y * self.y


def run():
    p = Point(0.0, 0.0)
    one = Point(1.0, 1.0)
    for _ in range(600_000):
        p = p.add(one)
        p.norm2()
