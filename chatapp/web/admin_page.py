"""The admin tab (admins only) and the admin API endpoints: the training run in progress with a
progress bar and live loss / reward curves, past runs, the adapters with Activate / Rollback,
feedback statistics, Train now, Export, and the online A/B test.

Invariants:
- Never imports torch; every action goes through `AdminService`, which checks the caller is an
  admin in each call. The tab is shown only to admins and its timers run only for them, but a
  non-admin calling any of these handlers (page event or API) gets "for admins only".
- Handlers are plain methods of `AdminPage` (inputs + `gr.Request`), testable without a server.
"""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from chatapp.learning import ab
from chatapp.core import config
from chatapp.web.admin import EXPORT_FORMATS, AdminService
from chatapp.web.api import as_gradio_errors, caller
from chatapp.web.users import Users

STATUS_EVERY_S = 1.0  # the progress bar and the curves
TABLES_EVERY_S = 3.0  # runs, adapters, statistics, A/B standing
RUN_COLUMNS = ["id", "status", "method", "rows", "steps", "estimate_min", "decision", "reason", "auc", "live_auc",
               "probe", "live_probe", "version", "parent", "started_at", "finished_at"]
ADAPTER_COLUMNS = ["version", "active", "parent", "method", "gate", "created_at"]


def _eta(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def progress_html(status: dict) -> str:
    """The run in progress (or the latest) as a progress bar with phase, step, loss and ETA."""
    trainer = status["trainer"]
    lines = [f"<p id='admin-trainer-state'><b>Trainer:</b> {html.escape(str(trainer.get('state')))} · "
             f"{html.escape(str(trainer.get('message', '')))}</p>",
             f"<p><b>Serving:</b> <code id='admin-serving'>{html.escape(status['serving'])}</code></p>"]
    if status.get("follow_error"):
        lines.append(f"<p><b>Not served:</b> {html.escape(status['follow_error'])}</p>")
    run = status["run"]
    if run is None:
        return "\n".join(lines + ["<p>No training run yet.</p>"])
    total, step = run["total_steps"] or 0, run["step"] or 0
    running = run["status"] == "running"
    loss = f" · loss {run['loss']:.4f}" if run["loss"] is not None else ""
    if running:
        # phases without steps (sampling, the gate, publishing) get an indeterminate bar (no max)
        value = f"value='{step}' max='{total}'" if total else ""
        where = f"{html.escape(run['phase'] or '')} · " + (f"step {step} of {total}" if total else "working")
        eta = f" · ETA {_eta(run['eta_s'])}" if run["eta_s"] is not None else ""
        outcome = ""
    else:  # finished: a full bar and the outcome
        value, where, eta = "value='1' max='1'", "finished", ""
        outcome = f" · <b>{html.escape(run['status'])}</b>: {html.escape(str(run['reason'] or ''))}"
    lines.append(f"<div id='admin-run' data-run='{run['id']}' data-status='{html.escape(run['status'])}' "
                 f"data-step='{step}' data-total='{total}'>"
                 f"<p><b>Run {run['id']}</b> ({html.escape(run['method'])}) · {where}{loss}{eta}{outcome}</p>"
                 f"<progress id='admin-progress-bar' {value} style='width:100%;height:1.2em'></progress></div>")
    return "\n".join(lines)


def curves(points: list[dict]) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(loss, rewards) frames for the line plots: x = step within the phase, one line per phase and
    metric (series "the scorer (kto): loss"); None where there is no point yet."""
    # typed even when empty: the plot fixes its axis types from the first frame it gets, and an
    # empty frame of object columns would make both axes categorical for good
    frame = pd.DataFrame(points or [], columns=["phase", "step", "name", "value"]).astype(
        {"phase": str, "step": "int64", "name": str, "value": "float64"})
    frame["series"] = frame["phase"].str.replace("training ", "", regex=False) + ": " + frame["name"]
    loss = frame[frame["name"] == "loss"][["step", "value", "series"]].reset_index(drop=True)
    rewards = frame[frame["name"].str.startswith("rewards/") | (frame["name"] == "kl")][["step", "value", "series"]]
    rewards = rewards.reset_index(drop=True)
    # None, not an empty frame: the plot builds its chart from the first data it gets (measured in
    # Chromium: after an empty frame it drew axes but no lines); None resets it for the next run
    return (loss if len(loss) else None), (rewards if len(rewards) else None)


def plot_updates(frames: tuple, run: dict | None, drawn: tuple) -> tuple[list, tuple]:
    """What to send to the plots, given what each one has drawn (its run and series, or None).
    Gradio's plot only swaps the data of a chart it has drawn and keeps its colour domain: a series
    that appears later (the next phase of a run) got no line (measured in Chromium; a changed title
    did not help). So a plot whose set of series changed is cleared (None) first, and gets the data
    at the next refresh, a second later. Returns (values, what each plot has drawn after them)."""
    values, now = [], []
    for frame, before in zip(frames, drawn):
        key = None if frame is None or run is None else (run["id"], tuple(dict.fromkeys(frame["series"])))
        if key is not None and before is not None and key != before:
            key, frame = None, None
        values.append(frame)
        now.append(key)
    return values, tuple(now)


def _runs_table(runs: list[dict]) -> pd.DataFrame:
    # the row keeps the step of its current phase; phases without steps (the gate, publishing) show none
    rows = [dict(r, steps=f"{r['step']}/{r['total_steps']}" if r["total_steps"] else "") for r in runs]
    return pd.DataFrame([{c: r.get(c) for c in RUN_COLUMNS} for r in rows], columns=RUN_COLUMNS)


def _adapters_table(adapters: list[dict]) -> pd.DataFrame:
    rows = []
    for a in adapters:
        rows.append({"version": a.get("version"), "active": "●" if a.get("active") else "",
                     "parent": a.get("parent") or "base", "method": a.get("method"),
                     "gate": a.get("gate") or a.get("error"), "created_at": a.get("created_at")})
    return pd.DataFrame(rows, columns=ADAPTER_COLUMNS)


class AdminPage:
    def __init__(self, admin: AdminService, users: Users):
        self.admin = admin
        self.users = users

    def _user(self, request):
        return caller(self.users, request)

    # ------------------------------------------------------------ handlers

    def load(self, request: gr.Request):
        """Show the tab and start its timers for admins only."""
        user = caller(self.users, request)
        show = user.is_admin
        return gr.Tab(visible=show), gr.Timer(active=show), gr.Timer(active=show)

    @as_gradio_errors
    def refresh_status(self, drawn, request: gr.Request):
        status = self.admin.status(self._user(request))
        values, drawn = plot_updates(curves(status["points"]), status["run"], drawn or (None, None))
        run = status["run"] or {}
        # changes when a run starts or ends or the served version changes: the tables refresh at once
        signal = f"{run.get('id')}:{run.get('status')}:{status['serving']}"
        return progress_html(status), *values, drawn, signal

    @as_gradio_errors
    def refresh_tables(self, request: gr.Request):
        user = self._user(request)
        runs = self.admin.runs(user)
        adapters = self.admin.adapters(user)
        stats = self.admin.feedback_stats(user)
        totals = pd.DataFrame([{"what": f"votes {k}", "count": v} for k, v in stats["votes"].items() if k] +
                              [{"what": k, "count": stats[k]} for k in ("preferences", "comparisons", "messages",
                                                                        "conversations")])
        by_adapter = pd.DataFrame(stats["by_adapter"], columns=["adapter", "vote", "n"])
        over_time = pd.DataFrame(stats["over_time"], columns=["hour", "vote", "n"])
        versions = ["base"] + [a["version"] for a in adapters]
        return (_runs_table(runs), _adapters_table(adapters), gr.Dropdown(choices=versions),
                gr.Dropdown(choices=versions), totals, by_adapter if len(by_adapter) else None,
                over_time if len(over_time) else None, self._ab_text(user))  # None: see curves()

    def _ab_text(self, user) -> str:
        status = self.admin.ab_status(user)
        test, last = status["test"], status["last"]
        lines = []
        if test:
            s = test["standing"]
            lines.append(f"**Running:** {s['candidate']} (candidate) vs {s['live']} (live) · policy "
                         f"{'on' if test['auto'] else 'off'} (decides after {test['min_votes']} picks)\n\n"
                         f"| version | wins | win rate | 95% CI |\n|---|---|---|---|\n"
                         f"| {s['candidate']} | {s['candidate_wins']} (+{s['ties']} ties) | {s['win_rate']:.0%} | "
                         f"{s['ci_low']:.0%}–{s['ci_high']:.0%} |\n"
                         f"| {s['live']} | {s['live_wins']} (+{s['ties']} ties) | {1 - s['win_rate']:.0%} | "
                         f"{1 - s['ci_high']:.0%}–{1 - s['ci_low']:.0%} |\n\n{test['reason']}")
        else:
            lines.append("No A/B test running: compare mode shows two samples of the live version.")
        if last:
            lines.append(f"\n\n**Last test:** {last.get('ended')}: {last.get('reason')}")
        return "".join(lines)

    @as_gradio_errors
    def train_now(self, request: gr.Request):
        result = self.admin.train_now(self._user(request))
        gr.Info(result["message"])
        return result["message"]

    @as_gradio_errors
    def activate(self, version, request: gr.Request):
        result = self.admin.activate(self._user(request), version)
        gr.Info(f"active: {result['active']}")
        return f"Active: {result['active']} (the chat switches within 2 seconds)"

    @as_gradio_errors
    def rollback(self, request: gr.Request):
        result = self.admin.rollback(self._user(request))
        gr.Info(f"rolled back: active is now {result['active']}")
        return f"Rolled back: active is now {result['active']} (the chat switches within 2 seconds)"

    @as_gradio_errors
    def export(self, fmt, request: gr.Request):
        return str(self.admin.export(self._user(request), fmt))

    @as_gradio_errors
    def ab_start(self, candidate, auto, min_votes, request: gr.Request):
        user = self._user(request)
        try:
            min_votes = int(min_votes)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
            min_votes = -1
        self.admin.ab_start(user, candidate, auto, min_votes)
        return self._ab_text(user)

    @as_gradio_errors
    def ab_stop(self, request: gr.Request):
        user = self._user(request)
        self.admin.ab_stop(user)
        return self._ab_text(user)

    # ------------------------------------------------------------ layout

    def build_tab(self) -> None:
        """The admin tab; call inside the Blocks (after the chat tab)."""
        private = dict(api_visibility="private", concurrency_limit=config.FEEDBACK_CONCURRENCY,
                       concurrency_id="admin")
        with gr.Tab("Admin", visible=False, elem_id="admin-tab") as tab:
            with gr.Row():
                train_now = gr.Button("Train now", elem_id="admin-train-now", variant="primary", scale=0)
                rollback = gr.Button("Rollback", elem_id="admin-rollback", scale=0)
                message = gr.Markdown(elem_id="admin-message")
            progress = gr.HTML(elem_id="admin-progress")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Loss", elem_id="admin-loss-plot",
                                        height=260)
                reward_plot = gr.LinePlot(x="step", y="value", color="series", title="Rewards",
                                          elem_id="admin-reward-plot", height=260)
            gr.Markdown("### Runs")
            runs = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, elem_id="admin-runs", max_height=300)
            gr.Markdown("### Adapters")
            adapters = gr.Dataframe(headers=ADAPTER_COLUMNS, interactive=False, elem_id="admin-adapters",
                                    max_height=300)
            with gr.Row():
                version = gr.Dropdown(label="Version", choices=["base"], elem_id="admin-version", scale=1)
                activate = gr.Button("Activate", elem_id="admin-activate", scale=0)
            gr.Markdown("### Feedback")
            with gr.Row():
                totals = gr.Dataframe(headers=["what", "count"], interactive=False, elem_id="admin-totals", scale=1,
                                      min_width=220)
                by_adapter = gr.BarPlot(x="adapter", y="n", color="vote", title="Votes by adapter version",
                                        elem_id="admin-votes-by-adapter", height=240, scale=2)
                over_time = gr.BarPlot(x="hour", y="n", color="vote", title="Votes per hour",
                                        elem_id="admin-votes-over-time", height=240, scale=2)
            gr.Markdown("### Online A/B test\nCompare mode pits the candidate against the live version on "
                        "users' own prompts (sides in random order); their picks give the win rate.")
            with gr.Row():
                candidate = gr.Dropdown(label="Candidate", choices=["base"], elem_id="admin-ab-candidate")
                auto = gr.Checkbox(label="Policy: promote a clear winner automatically", elem_id="admin-ab-auto")
                min_votes = gr.Number(label="Picks before deciding", value=ab.DEFAULT_MIN_VOTES, precision=0,
                                      elem_id="admin-ab-min-votes")
                ab_start = gr.Button("Start A/B", elem_id="admin-ab-start", scale=0)
                ab_stop = gr.Button("Stop A/B", elem_id="admin-ab-stop", scale=0)
            ab_text = gr.Markdown(elem_id="admin-ab")
            gr.Markdown("### Export")
            with gr.Row():
                fmt = gr.Dropdown(list(EXPORT_FORMATS), value="kto", label="Format", elem_id="admin-export-format")
                export = gr.Button("Export", elem_id="admin-export", scale=0)
                exported = gr.File(label="TRL-ready data (zip)", elem_id="admin-export-file")
            status_timer = gr.Timer(STATUS_EVERY_S, active=False)
            tables_timer = gr.Timer(TABLES_EVERY_S, active=False)

        drawn = gr.State((None, None))  # what each plot shows, per browser tab: see plot_updates()
        run_signal = gr.State("")
        status_outputs = [progress, loss_plot, reward_plot, drawn, run_signal]
        table_outputs = [runs, adapters, version, candidate, totals, by_adapter, over_time, ab_text]
        self.tab = tab
        gr.on([tab.select], self.refresh_status, [drawn], status_outputs, **private)
        gr.on([tab.select], self.refresh_tables, None, table_outputs, **private)
        status_timer.tick(self.refresh_status, [drawn], status_outputs, **private)
        tables_timer.tick(self.refresh_tables, None, table_outputs, **private)
        run_signal.change(self.refresh_tables, None, table_outputs, **private)
        train_now.click(self.train_now, None, [message], **private)
        activate.click(self.activate, [version], [message], **private).then(
            self.refresh_tables, None, table_outputs, **private)
        rollback.click(self.rollback, None, [message], **private).then(
            self.refresh_tables, None, table_outputs, **private)
        export.click(self.export, [fmt], [exported], **private)
        ab_start.click(self.ab_start, [candidate, auto, min_votes], [ab_text], **private)
        ab_stop.click(self.ab_stop, None, [ab_text], **private)
        self.timers = (status_timer, tables_timer)


def register(admin: AdminService, users: Users) -> None:
    """The admin API endpoints (each checks the caller is an admin)."""
    quick = dict(concurrency_limit=config.FEEDBACK_CONCURRENCY, concurrency_id="admin")

    @as_gradio_errors
    def admin_status(request: gr.Request = None) -> dict:
        """Admins: the training run in progress (or the latest) with its curve points, the trainer's
        state and the version being served."""
        return admin.status(caller(users, request))

    @as_gradio_errors
    def runs(request: gr.Request = None) -> list[dict]:
        """Admins: past training runs, newest first, with method, data size, gate metrics and decision."""
        return admin.runs(caller(users, request))

    @as_gradio_errors
    def train_now(request: gr.Request = None) -> dict:
        """Admins: ask the background trainer to start a run now."""
        return admin.train_now(caller(users, request))

    @as_gradio_errors
    def adapters(request: gr.Request = None) -> list[dict]:
        """Admins: the published adapter versions with their metadata."""
        return admin.adapters(caller(users, request))

    @as_gradio_errors
    def activate(version: str, request: gr.Request = None) -> dict:
        """Admins: make `version` (or "base") the live adapter; the chat switches within 2 seconds."""
        return admin.activate(caller(users, request), version)

    @as_gradio_errors
    def rollback(request: gr.Request = None) -> dict:
        """Admins: go back to the previously active version."""
        return admin.rollback(caller(users, request))

    @as_gradio_errors
    def ab_status(request: gr.Request = None) -> dict:
        """Admins: the running A/B test with the candidate's win rate and 95% interval, and the last test."""
        return admin.ab_status(caller(users, request))

    @as_gradio_errors
    def ab_start(candidate: str, auto: bool = False, min_votes: int = ab.DEFAULT_MIN_VOTES,
                 request: gr.Request = None) -> dict:
        """Admins: pit `candidate` against the live version in every compare request; with auto, promote a
        clear winner (or keep the live version when it wins clearly) after `min_votes` picks."""
        return admin.ab_start(caller(users, request), candidate, auto, min_votes)

    @as_gradio_errors
    def ab_stop(request: gr.Request = None) -> dict:
        """Admins: end the A/B test."""
        return admin.ab_stop(caller(users, request))

    for fn in (admin_status, runs, train_now, adapters, activate, rollback, ab_status, ab_start, ab_stop):
        gr.api(fn, api_name=fn.__name__, **quick)
