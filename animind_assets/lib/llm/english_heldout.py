"""A small held-out set of public-domain English paragraphs for the English-retention check.

The fine-tune measures the language model's perplexity on these paragraphs before and after
training: a large rise means the model forgot ordinary English while learning semantic IDs.
All texts are in the public domain (authors died more than 100 years ago / US government works):
Jane Austen (1813), Herman Melville (1851), Lewis Carroll (1865), Charles Dickens (1859),
Mary Shelley (1818), Arthur Conan Doyle (1892), the US Declaration of Independence (1776),
Abraham Lincoln (1863), Henry David Thoreau (1854), Mark Twain (1876).
"""

from __future__ import annotations

PARAGRAPHS: list[str] = [
    # Jane Austen, Pride and Prejudice (1813), chapter 1
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered as the rightful property of some one or other of their daughters.",
    # Herman Melville, Moby-Dick (1851), chapter 1
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
    "watery part of the world. It is a way I have of driving off the spleen and regulating the circulation.",
    # Lewis Carroll, Alice's Adventures in Wonderland (1865), chapter 1
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to "
    "do: once or twice she had peeped into the book her sister was reading, but it had no pictures or "
    "conversations in it, and what is the use of a book, thought Alice, without pictures or conversations?",
    # Charles Dickens, A Tale of Two Cities (1859), book 1, chapter 1
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair.",
    # Mary Shelley, Frankenstein (1818), letter 1
    "You will rejoice to hear that no disaster has accompanied the commencement of an enterprise which you "
    "have regarded with such evil forebodings. I arrived here yesterday, and my first task is to assure my "
    "dear sister of my welfare and increasing confidence in the success of my undertaking.",
    # Arthur Conan Doyle, The Adventures of Sherlock Holmes (1892), A Scandal in Bohemia
    "To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any other name. "
    "In his eyes she eclipses and predominates the whole of her sex. It was not that he felt any emotion "
    "akin to love for Irene Adler. All emotions, and that one particularly, were abhorrent to his cold, "
    "precise but admirably balanced mind.",
    # United States Declaration of Independence (1776)
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by "
    "their Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of "
    "Happiness. That to secure these rights, Governments are instituted among Men, deriving their just "
    "powers from the consent of the governed.",
    # Abraham Lincoln, Gettysburg Address (1863)
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived "
    "in Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a "
    "great civil war, testing whether that nation, or any nation so conceived and so dedicated, can long "
    "endure.",
    # Henry David Thoreau, Walden (1854), Where I Lived, and What I Lived For
    "I went to the woods because I wished to live deliberately, to front only the essential facts of life, "
    "and see if I could not learn what it had to teach, and not, when I came to die, discover that I had "
    "not lived.",
    # Mark Twain, The Adventures of Tom Sawyer (1876), chapter 2
    "Saturday morning was come, and all the summer world was bright and fresh, and brimming with life. "
    "There was a song in every heart; and if the heart was young the music issued at the lips. There was "
    "cheer in every face and a spring in every step. The locust-trees were in bloom and the fragrance of "
    "the blossoms filled the air.",
]
