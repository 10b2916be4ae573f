"""Realistic article pages and feeds that the importer tests serve from 127.0.0.1.

Each page carries the clutter a real one has (navigation, cookie banner, ads,
related links, share buttons, comments, footer) so the tests can check that none
of it reaches the article. ``BOILERPLATE`` lists those strings.
"""

from __future__ import annotations

import json
from xml.sax.saxutils import escape

# Strings from the page furniture: none may appear in an extracted article.
BOILERPLATE = (
    "Subscribe today and save",
    "Weather forecast centre",
    "We use cookies",
    "Stormproof 3000",
    "Holiday cottages from",
    "Lighthouse keepers return",
    "Ten best chip shops",
    "Share on Facebook",
    "Typical council nonsense",
    "about time",
    "All rights reserved",
    "morning briefing",
    "Recent Posts",
    "Tag cloud",
    "Leave a Reply",
    "Sponsored content",
)


def news_article(
    *, canonical: str = "https://news.example.org/2025/03/harbour-ferry-timetable"
) -> str:
    """A news site's article: OpenGraph, JSON-LD NewsArticle, a list, a quote, links, comments."""
    ld = {
        "@context": "https://schema.org",
        "@type": "NewsArticle",
        "headline": "Harbour towns rethink the winter ferry timetable",
        "datePublished": "2025-03-14T08:30:00+00:00",
        "author": {"@type": "Person", "name": "Maren Holt"},
        "publisher": {"@type": "Organization", "name": "The Coastal Ledger"},
        "image": "https://news.example.org/media/ferry-lead.jpg",
    }
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Harbour towns rethink the winter ferry timetable | The Coastal Ledger</title>
<link rel="canonical" href="{canonical}">
<meta property="og:title" content="Harbour towns rethink the winter ferry timetable">
<meta property="og:site_name" content="The Coastal Ledger">
<meta property="og:type" content="article">
<meta property="og:url" content="{canonical}">
<meta property="og:image" content="https://news.example.org/media/ferry-lead.jpg">
<meta property="og:description" \
content="Three councils want a shared timetable before next winter.">
<meta name="author" content="Maren Holt">
<meta property="article:published_time" content="2025-03-14T08:30:00+00:00">
<script type="application/ld+json">{json.dumps(ld)}</script>
<script>window.dataLayer = [{{"event": "pageview"}}];</script>
<style>.ad {{ border: 1px solid #ccc; }}</style>
</head>
<body>
<header class="site-header">
  <nav class="main-nav" aria-label="Main"><ul>
    <li><a href="/">Home</a></li><li><a href="/politics">Politics</a></li>
    <li><a href="/weather">Weather forecast centre</a></li>
    <li><a href="/subscribe">Subscribe today and save forty percent</a></li>
  </ul></nav>
  <div class="cookie-banner" id="cookie-consent">We use cookies to improve your experience.
    <button>Accept all cookies</button></div>
</header>
<div class="ad ad-leaderboard" id="ad-top">\
Advertisement: the Stormproof 3000 raincoat, now half price</div>
<main id="main">
<article class="post story">
  <h1 class="entry-title headline">Harbour towns rethink the winter ferry timetable</h1>
  <p class="byline">By <a rel="author" href="/authors/maren-holt">Maren Holt</a> ·
    <time datetime="2025-03-14">March 14, 2025</time></p>
  <figure class="lead"><img src="/media/ferry-lead.jpg" alt="A ferry leaving the harbour at dawn">
    <figcaption>The early ferry at Northby.</figcaption></figure>
  <div class="entry-content story-body">
    <p>Three harbour councils met on Thursday to agree a shared winter timetable for the
    ferries that link their towns, after a season in which crossings were cancelled at
    short notice more than forty times.</p>
    <p>The proposal, published by the
    <a href="https://councils.example.org/ferry-plan">joint transport committee</a>, would
    move the first crossing later in the morning and add a late sailing on Fridays.</p>
    <p>The committee listed its main aims:</p>
    <ul>
      <li>fewer cancellations announced on the day,</li>
      <li>a timetable that matches the school run, and</li>
      <li>one ticket valid on every route.</li>
    </ul>
    <div class="ad ad-inline" data-ad-slot="2">\
Advertisement: Holiday cottages from 49 pounds a night</div>
    <blockquote><p>We heard the same thing at every meeting: people can live with a slower
    ferry, but not with one that might not come.</p></blockquote>
    <p>The chair of the committee, Ilse Brand, said the plan would be put to residents in
    April and, if approved, would start in October, with a <em>trial month</em> first.</p>
    <p>Operators have asked for a guarantee on fuel subsidies before they commit, and the
    councils expect an answer from the regional authority by the end of the month.</p>
    <p>Residents can read the full plan at the <a href="/library/ferry-plan">town library</a>
    or <a href="javascript:alert(1)">open it here</a>.</p>
  </div>
  <aside class="related"><h3>Related stories</h3><ul>
    <li><a href="/a">Lighthouse keepers return to Skerry Point</a></li>
    <li><a href="/b">Ten best chip shops on the coast</a></li></ul></aside>
  <div class="share-buttons social">Share on Facebook · Share on X · Email this story</div>
</article>
<section id="comments" class="comments">
  <h2>Comments (2)</h2>
  <div class="comment"><p class="comment-author">sailor_joe</p>
    <p>Typical council nonsense, they never listen to anyone who actually uses the boats.</p></div>
  <div class="comment"><p class="comment-author">m.k.</p>
    <p>Finally some common sense about the Friday sailing, about time.</p></div>
</section>
</main>
<footer class="site-footer"><p>© 2025 The Coastal Ledger. All rights reserved. Privacy policy.</p>
<p>Newsletter signup: get the morning briefing in your inbox.</p></footer>
</body></html>
"""


def blog_post() -> str:
    """A blog post: metadata only in JSON-LD and <time>, an ordered list, sidebar widgets."""
    ld = {
        "@context": "https://schema.org",
        "@graph": [
            {"@type": "WebSite", "name": "Tram Notes", "url": "https://tramnotes.example.net/"},
            {
                "@type": "BlogPosting",
                "headline": "Why the number 4 tram is always late on Mondays",
                "datePublished": "2024-11-02T07:15:00Z",
                "author": {"@type": "Person", "name": "Ruairi Kestle"},
                "publisher": {"@type": "Organization", "name": "Tram Notes"},
            },
        ],
    }
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
<title>Why the number 4 tram is always late on Mondays – Tram Notes</title>
<script type="application/ld+json">{json.dumps(ld)}</script>
</head>
<body class="single-post">
<div id="page">
<div id="masthead"><a class="site-title" href="/">Tram Notes</a>
  <ul class="menu"><li><a href="/about">About</a></li>\
<li><a href="/archive">Archive</a></li></ul></div>
<div id="content" class="site-content">
<div id="primary"><div class="post hentry">
  <h2 class="entry-title">Why the number 4 tram is always late on Mondays</h2>
  <div class="entry-meta">Posted on \
<time class="entry-date published" datetime="2024-11-02T07:15:00Z">2 November 2024</time>
    by <span class="author vcard">Ruairi Kestle</span></div>
  <div class="entry-content">
    <p>Every Monday morning the number 4 tram leaves the depot four minutes behind its
    timetable, and by the time it reaches the university it is twelve minutes late.</p>
    <p>I spent three Mondays riding it end to end with a stopwatch. Here is what eats the time:</p>
    <ol>
      <li>the weekend's track inspection overruns into the first departure,</li>
      <li>drivers change over at the depot gate instead of at the terminus, and</li>
      <li>the market stalls on Bridge Street narrow the road for the first hour.</li>
    </ol>
    <blockquote><p>Fix the changeover and you win back half of it.</p>
      <cite>— a driver with twenty years on the route</cite></blockquote>
    <p>None of this is hard to fix. The operator says it will move the changeover from
    January, which should bring the first tram back to within two minutes.</p>
    <div class="sponsored">Sponsored content: compare tram passes in your city</div>
  </div>
</div>
<div id="comments" class="comments-area"><h3 id="reply-title">Leave a Reply</h3>
  <form><textarea name="comment"></textarea><input type="submit" value="Post Comment"></form></div>
</div>
<div id="secondary" class="widget-area sidebar">
  <section class="widget"><h2>Recent Posts</h2>\
<ul><li><a href="/p/1">Ten years of the night tram</a></li></ul></section>
  <section class="widget"><h2>Tag cloud</h2>\
<a href="/t/trams">trams</a> <a href="/t/delays">delays</a></section>
</div>
</div></div></body></html>
"""


def bare_page() -> str:
    """A page with a title and text but no author, date, site name or image."""
    paragraphs = "".join(
        f"<p>Paragraph {n} of the bare page talks about bus shelters and their benches, "
        f"which matter more to riders than most planners think, item {n}.</p>"
        for n in range(1, 7)
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Bus shelters, counted</title></head>
<body><div class="menu"><a href="/">Home</a></div>
<div class="content"><h1>Bus shelters, counted</h1>{paragraphs}</div>
<div class="footer">All rights reserved.</div></body></html>
"""


def rss_feed(items: list[tuple[str, str, str]], *, title: str = "The Coastal Ledger") -> bytes:
    """An RSS 2.0 feed of (title, link, pubDate) items."""
    entries = "".join(
        f"<item><title>{escape(t)}</title><link>{escape(link)}</link>"
        f"<guid>{escape(link)}</guid><pubDate>{date}</pubDate>"
        f"<description>About {escape(t)}.</description></item>"
        for t, link, date in items
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<rss version="2.0"><channel><title>{escape(title)}</title>'
        f"<link>https://news.example.org/</link><description>News</description>"
        f"{entries}</channel></rss>\n"
    ).encode()


def atom_feed(entries: list[tuple[str, str, str]]) -> bytes:
    """An Atom feed of (title, link, updated ISO date) entries."""
    body = "".join(
        f'<entry><title>{escape(t)}</title><link href="{escape(link)}"/>'
        f"<id>urn:example:{escape(link)}</id><updated>{updated}</updated>"
        f"<author><name>Ruairi Kestle</name></author></entry>"
        for t, link, updated in entries
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<feed xmlns="http://www.w3.org/2005/Atom"><title>Tram Notes</title>'
        "<id>urn:example:tram-notes</id><updated>2024-11-02T07:15:00Z</updated>"
        f"{body}</feed>\n"
    ).encode()
