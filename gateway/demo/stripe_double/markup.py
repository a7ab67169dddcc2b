"""What the Stripe test double's HTML pages share: the page frame and its style, escaping, and
amounts, prices and dates as people read them (money as the gate's landing page and Stripe's
own pages show it: :func:`gateway.plans.format_amount`, so ¥1,900 is never "19.00")."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.demo.stripe_double.objects import ENDED_STATUSES, Obj
from gateway.demo.stripe_double.state import DoubleState
from gateway.plans import format_amount, plan_from_price

__all__ = [
    "amount_text",
    "day",
    "esc",
    "local_redirect",
    "page",
    "price_label",
    "price_text",
    "when",
]

_STYLE = """
:root{--ink:#1a1f36;--muted:#697386;--line:#e3e8ee;--accent:#635bff;--bg:#f6f9fc}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:34rem;
margin:0 auto;padding:1.5rem 1rem 3rem;color:var(--ink);background:var(--bg)}
h1{font-size:1.45rem;margin:.5rem 0 .25rem} h2{font-size:1.1rem;margin:0 0 .25rem}
.box{background:#fff;border:1px solid var(--line);border-radius:12px;padding:1.25rem 1.5rem;
margin:1rem 0;box-shadow:0 2px 8px rgba(50,50,93,.06)}
.price{font-size:1.6rem;font-weight:650;margin:.25rem 0}
.muted{color:var(--muted);font-size:.9rem} .error{color:#df1b41;background:#fff0f3;
border:1px solid #ffc9d4;border-radius:8px;padding:.5rem .75rem}
.test{background:#fff8e1;color:#8a5a00;padding:.35rem .75rem;border-radius:999px;
font-size:.8rem;font-weight:600;display:inline-block;margin:0}
label{display:block;font-weight:550;font-size:.9rem;margin:.9rem 0 .3rem}
input,select{font:inherit;width:100%;padding:.55rem .7rem;border:1px solid var(--line);
border-radius:8px;background:#fff;color:var(--ink)}
input[readonly]{background:#f6f8fa;color:var(--muted)}
button{font:inherit;font-weight:600;padding:.55rem 1.1rem;margin:.35rem .35rem .35rem 0;
border-radius:8px;border:1px solid var(--line);background:#fff;color:var(--ink);cursor:pointer}
button#pay,button.primary,button#save-card,button#confirm-update{background:var(--accent);
color:#fff;border-color:var(--accent)}
#pay{width:100%;padding:.75rem;font-size:1rem;margin:1.1rem 0 .25rem}
form{display:inline} form.stack{display:block}
.hint{background:#f0f4ff;border-radius:8px;padding:.4rem .7rem;font-size:.85rem;color:#3c4257}
code{background:#eef0f7;border-radius:4px;padding:0 .3rem}
table{border-collapse:collapse;width:100%;font-size:.9rem;background:#fff}
td,th{border-bottom:1px solid var(--line);padding:.4rem .5rem;text-align:left}
td select,td input{width:auto}
a{color:var(--accent)}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, body: str, status: int = 200) -> web.Response:
    text = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<link rel="icon" href="/favicon.ico" type="image/svg+xml">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
        f'<p class="test">Stripe test double — test mode, no real payment</p>'
        f"{body}</body></html>"
    )
    return web.Response(text=text, status=status, content_type="text/html")


def day(ts: int | None) -> str:
    """A date as people read it: ``1 Jan 2027`` (UTC)."""
    if ts is None:
        return ""
    at = datetime.fromtimestamp(ts, UTC)
    return f"{at.day} {at:%b %Y}"


def local_redirect(target: str | None, fallback: str) -> str:
    """Only same-site paths (``/x``), never ``//host`` or absolute URLs."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return fallback


def amount_text(amount: int, currency: str) -> str:
    """A Stripe amount (the currency's minor unit) as the landing page shows it: ``$19.00``,
    ``¥1,900``."""
    return format_amount(amount, currency)


def price_text(price: Obj) -> str:
    """``$19.00 / month``, ``¥1,900 / 3 months``: a price as the landing page labels it."""
    return plan_from_price(price).label


def price_label(products: dict[str, Obj], price: Obj) -> str:
    """``PatentLLM Pro — $190.00 / year``: the product's name and the price."""
    if not price:
        return ""
    product = products.get(str(price.get("product")), {})
    name = str(product.get("name") or price.get("nickname") or price.get("id"))
    return f"{name} — {price_text(price)}"


def when(sub: Obj) -> str:
    """What the subscription's dates mean to its customer: ``Renews on 1 Jan 2027``..."""
    end = DoubleState.period(sub)[1]
    if sub["status"] in ENDED_STATUSES:
        return f"Ended on {day(sub['ended_at'])}"
    if sub["cancel_at"] is not None:
        return f"Ends on {day(sub['cancel_at'])}"
    if sub["status"] == "trialing":
        return f"Trial ends on {day(sub['trial_end'])}, then renews"
    return f"Renews on {day(end)}"
