#!/usr/bin/env python3
"""Fails when a project file uses a C++ standard library name without including its header.

A missing standard include compiles or not depending on which headers the standard library (or
Eigen, Catch2, CLI11) happens to include transitively, so it slips through one toolchain and
breaks on another. include-what-you-use knows which standard header declares each name it sees
used; this script runs it on every C++ translation unit of compile_commands.json (CUDA sources
excepted), also over the project's own headers (--check_also), and reports each standard header
that a file needs but neither includes itself nor gets from a project header it includes (the
project's own headers are the same on every toolchain; other IWYU advice, e.g. about project or
third-party headers, is not checked).

  check_std_includes.py --build-dir BUILD --source-dir SOURCE [--iwyu PATH] [--jobs N]

BUILD/compile_commands.json: CMAKE_EXPORT_COMPILE_COMMANDS (CLSA_CHECK_INCLUDES sets it); the
test lint.std_includes of the libcxx preset runs this.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

# The C++17 standard library headers (C++ and C compatibility ones).
STD_HEADERS = set("""
algorithm any array atomic bitset cassert ccomplex cctype cerrno cfenv cfloat charconv chrono
cinttypes ciso646 climits clocale cmath codecvt complex condition_variable csetjmp csignal
cstdalign cstdarg cstdbool cstddef cstdint cstdio cstdlib cstring ctgmath ctime cuchar cwchar
cwctype deque exception execution filesystem forward_list fstream functional future
initializer_list iomanip ios iosfwd iostream istream iterator limits list locale map memory
memory_resource mutex new numeric optional ostream queue random ratio regex scoped_allocator set
shared_mutex sstream stack stdexcept streambuf string string_view strstream system_error thread
tuple type_traits typeindex typeinfo unordered_map unordered_set utility valarray variant vector
""".split())
# Standard headers that the standard makes provide others: mandated includes, or a base class
# that must be complete (std::logic_error derives from std::exception).
IMPLIED = {"stdexcept": {"exception"}, "system_error": {"stdexcept", "exception"}, "cinttypes": {"cstdint"},
           "iostream": {"ios", "streambuf", "istream", "ostream", "iosfwd"}, "ios": {"iosfwd"}}
for _header in ("array deque forward_list list map set unordered_map unordered_set vector string regex valarray "
                "utility algorithm random").split():
    IMPLIED.setdefault(_header, set()).add("initializer_list")
SIZE_TYPES = {"size_t", "ptrdiff_t", "nullptr_t", "max_align_t"}
INCLUDE_LINE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
SHOULD_ADD = re.compile(r"^(.+) should add these lines:$")


def normalize(header):
    """<stdint.h> and <cstdint> are the same need."""
    if header.endswith(".h") and "/" not in header and "c" + header[:-2] in STD_HEADERS:
        return "c" + header[:-2]
    return header


def first_word(name):
    """The identifier that spells a name IWYU cites: "tuple_element<>::type" -> tuple_element,
    "operator new" -> new."""
    words = [w for w in re.findall(r"[A-Za-z_]\w*", name) if w != "operator"]
    return words[0] if words else None


def iwyu_args(entry):
    """The compile command of one entry, as arguments for include-what-you-use."""
    args = entry["arguments"] if "arguments" in entry else shlex.split(entry["command"])
    out = []
    skip = False
    for arg in args[1:]:
        if skip:
            skip = False
        elif arg in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
        elif arg in ("-c", "-MD", "-MMD") or arg == entry["file"] or arg.startswith("-stdlib="):
            # IWYU's mapping of private to public headers is libstdc++'s; the standard says which
            # header declares what, whichever library compiles it.
            pass
        else:
            out.append(arg)
    return out + [entry["file"]]


def include_dirs(entry):
    args = entry["arguments"] if "arguments" in entry else shlex.split(entry["command"])
    dirs = []
    for i, arg in enumerate(args):
        for flag in ("-I", "-isystem", "-iquote"):
            if arg == flag and i + 1 < len(args):
                dirs.append(args[i + 1])
            elif arg.startswith(flag) and len(arg) > len(flag):
                dirs.append(arg[len(flag):])
    return [os.path.realpath(os.path.join(entry["directory"], d)) for d in dirs]


class Project:
    def __init__(self, roots, dirs):
        self.roots = [os.path.realpath(r) + os.sep for r in roots]
        self.dirs = [d for d in dirs if self.owns(d + os.sep)]
        self.cache = {}
        self.words = {}

    def owns(self, path):
        return any(path.startswith(root) for root in self.roots)

    def resolve(self, name, quoted, including):
        candidates = ([os.path.dirname(including)] if quoted else []) + self.dirs
        for directory in candidates:
            path = os.path.realpath(os.path.join(directory, name))
            if os.path.isfile(path) and self.owns(path):
                return path
        return None

    def spells(self, path, names):
        """Whether `path` itself (comments and strings aside) names one of the standard library's
        `names` that IWYU cites. A name that is not in the file's text is used from a template
        instantiation or a macro of other code (Eigen's internals, Catch2's macros): that code
        includes what it needs, and IWYU 0.18 attributes such uses to the file unreliably."""
        if not names:
            return True
        if path not in self.words:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            text = re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', " ", text,
                          flags=re.S)
            self.words[path] = set(re.findall(r"[A-Za-z_]\w*", text))
        return any(first_word(name) in self.words[path] for name in names)

    def provided(self, path, including=()):
        """Standard headers that `path` includes, itself or through project headers (`including`:
        the chain of project files that include `path`, to stop at include cycles)."""
        if path in self.cache:
            return self.cache[path]
        including = including + (path,)
        result = set()
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for kind, name in INCLUDE_LINE.findall(text):
            header = normalize(name)
            if header in STD_HEADERS:
                result |= {header} | IMPLIED.get(header, set())
                continue
            target = self.resolve(name, kind == '"', path)
            if target and target not in including:
                result |= self.provided(target, including)
        self.cache[path] = result
        return result


INCOMPLETE = re.compile(r"error: invalid application of 'sizeof' to an incomplete type '([\w:]+)'")


def run_iwyu(iwyu, entry, source_dir, scratch):
    """IWYU's output for one entry. IWYU defines every implicit member of every class it sees,
    which a compiler does only where one is used: a header with a pimpl (std::unique_ptr<State>,
    State defined in the .cpp) and an inline `= default` constructor makes IWYU fail with "sizeof
    to an incomplete type" (include-what-you-use issue 755). Then the entry is analysed again
    through a wrapper that includes it and defines those types empty at its end; --check_also
    still reports on the source itself."""
    args = iwyu_args(entry)
    stubs = []
    for _ in range(4):
        command = [iwyu, "-Xiwyu", "--max_line_length=1000", "-Xiwyu", "--check_also=" + source_dir + "/*"] + args
        output = subprocess.run(command, cwd=entry["directory"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True).stdout
        incomplete = [name for name in INCOMPLETE.findall(output) if name not in stubs]
        if not incomplete:
            break
        stubs += sorted(set(incomplete))
        source = os.path.realpath(os.path.join(entry["directory"], entry["file"]))
        wrapper = os.path.join(scratch, "{:x}_{}".format(abs(hash(source)), os.path.basename(source)))
        with open(wrapper, "w", encoding="utf-8") as f:
            f.write('#include "{}"\n'.format(source))
            f.writelines("struct {} {{}};\n".format(name) for name in stubs)
        args = args[:-1] + [wrapper]
    return entry["file"], output


def parse(output, directory):
    """(file, standard header) pairs that IWYU says should be added, and compile errors."""
    needs, errors = {}, []
    current = None
    for line in output.splitlines():
        if re.search(r"(^|: )(fatal )?error: ", line):
            errors.append(line)
        match = SHOULD_ADD.match(line)
        if match:
            current = os.path.realpath(os.path.join(directory, match.group(1)))
            continue
        if not line.strip() or line.startswith("---") or " should remove these lines" in line or \
                line.startswith("The full include-list"):
            current = None
            continue
        if current:
            include = re.match(r"#include <([^>]+)>\s*(?://\s*for\s*(.*))?$", line.strip())
            if not include:
                continue
            header = normalize(include.group(1))
            names = tuple(n.strip() for n in (include.group(2) or "").split(",") if n.strip())
            # Declared by every standard library's headers in practice (IWYU 0.18 also maps
            # ptrdiff_t to <iosfwd>): never the include that breaks on another toolchain.
            names = tuple(n for n in names if n not in SIZE_TYPES)
            if header in STD_HEADERS and (names or not include.group(2)):
                needs.setdefault((current, header), set()).update(names)
    return needs, errors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", required=True)
    parser.add_argument("--source-dir", required=True)
    parser.add_argument("--iwyu", default="include-what-you-use")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    options = parser.parse_args()
    source_dir = os.path.realpath(options.source_dir)
    build_dir = os.path.realpath(options.build_dir)
    with open(os.path.join(build_dir, "compile_commands.json"), encoding="utf-8") as f:
        database = json.load(f)
    entries = [e for e in database
               if e["file"].endswith((".cpp", ".cc", ".cxx"))
               and os.path.realpath(e["file"]).startswith(source_dir + os.sep)
               and not os.path.realpath(e["file"]).startswith(build_dir + os.sep)]
    entries = list({os.path.realpath(os.path.join(e["directory"], e["file"])): e for e in entries}.values())
    if not entries:
        print("check_std_includes: no C++ sources in " + build_dir + "/compile_commands.json")
        return 1
    project = Project([source_dir, build_dir], sorted({d for e in entries for d in include_dirs(e)}))
    missing, failed = {}, []
    scratch = tempfile.mkdtemp(prefix="check_std_includes.")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        jobs = [pool.submit(run_iwyu, options.iwyu, e, source_dir, scratch) for e in entries]
        for job, entry in zip(jobs, entries):
            file, output = job.result()
            needs, errors = parse(output, entry["directory"])
            if errors:
                failed.append(file + ":\n  " + "\n  ".join(errors[:5]))
            for (path, header), names in needs.items():
                if project.owns(path) and header not in project.provided(path) and project.spells(path, names):
                    missing.setdefault(path, {}).setdefault(header, set()).update(names)
    shutil.rmtree(scratch, ignore_errors=True)
    for message in failed:
        print("check_std_includes: include-what-you-use could not compile " + message)
    count = 0
    for path in sorted(missing):
        shown = os.path.relpath(path, source_dir)
        for header, names in sorted(missing[path].items()):
            count += 1
            print("{}: missing #include <{}> (for {})".format(shown, header, ", ".join(sorted(names)) or "?"))
    print("check_std_includes: {} translation units; {} missing standard includes{}".format(
        len(entries), count, "; {} not analysed".format(len(failed)) if failed else ""))
    return 1 if count or failed else 0


if __name__ == "__main__":
    sys.exit(main())
