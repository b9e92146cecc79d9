"""Plain functions as tools (`environment.tools: [examples/my_tools.py:unit_price]`): the type hints and the
docstring's Args section become the JSON schema the model is shown, as transformers derives it."""


def unit_price(total: float, count: int) -> str:
    """The price of one item.

    Args:
        total: the price of all the items together
        count: how many items
    """
    return f"{total / count:.2f}"
