#!/usr/bin/env python3
"""Fails when the library's modules depend on each other in a cycle.

A module uses another when its non-test code names a path into it
(`crate::a::b`, `super::x`, or a child module `seed::x`); `mod` declarations
alone are ownership, not use. Test code (`#[cfg(test)]` items) is left out.
Prints every cycle, as modules, and exits 1 if there is one.
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_of(path):
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return tuple(parts)


def strip(text):
    """Comments, string and char literals out; then `#[cfg(test)]` items."""
    text = re.sub(r'r(#*)".*?"\1', '""', text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text, flags=re.S)
    text = re.sub(r"'(\\.|[^'\\])'", "' '", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        # Skip the item: to its first `;` at depth 0 or its closing brace.
        j, depth = m.end(), 0
        while j < len(text):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    j += 1
                    break
            elif c == ";" and depth == 0:
                j += 1
                break
            j += 1
        i = j
    out.append(text[i:])
    return inline_modules("".join(out))


def inline_modules(text):
    """`super::` inside an inline `mod x { }` names the file's own module."""
    for m in reversed(list(re.finditer(rf"\bmod {IDENT}\s*\{{", text))):
        j, depth = m.end() - 1, 0
        while j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                break
            j += 1
        inner = text[m.end():j].replace("super::", "self::")
        text = text[:m.end()] + inner + text[j:]
    return text


def main():
    files = [p for p in SRC.rglob("*.rs") if p.parts[len(SRC.parts)] != "bin" and p.name != "main.rs"]
    modules = {module_of(p): p for p in files}
    uses = {}
    for mod, path in modules.items():
        text = strip(path.read_text())
        children = {m[-1] for m in modules if len(m) == len(mod) + 1 and m[:-1] == mod}
        targets = set()
        for m in re.finditer(rf"\b((?:crate|super|self|{IDENT})(?:::{IDENT})+)", text):
            parts = m.group(1).split("::")
            if parts[0] == "crate":
                base, rest = (), parts[1:]
            elif parts[0] in ("super", "self"):
                base = mod
                while parts and parts[0] in ("super", "self"):
                    base = base[:-1] if parts.pop(0) == "super" else base
                rest = parts
            elif parts[0] in children:
                base, rest = mod, parts
            else:
                continue
            for k in range(len(rest), -1, -1):
                if base + tuple(rest[:k]) in modules:
                    target = base + tuple(rest[:k])
                    if target != mod:
                        targets.add(target)
                    break
        uses[mod] = targets
    cycles = strongly_connected(uses)
    for comp in cycles:
        print("module cycle: " + ", ".join("::".join(("crate",) + m) for m in sorted(comp)))
    print(f"module-cycles: {len(modules)} modules, {sum(map(len, uses.values()))} uses, {len(cycles)} cycles")
    return 1 if cycles else 0


def strongly_connected(graph):
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    sys.exit(main())
