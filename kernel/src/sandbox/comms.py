"""Jupyter comms in the sandbox: the comm manager and the `Comm` class, with the API of the `comm`
package (>= 0.1.3) that ipywidgets 8 and others call, over the kernel's door.

Loaded into the driver's namespace (it runs with the driver's globals) the first time a comm is
needed: a frontend's comm message (`comm_open`, `comm_msg`, `comm_close`), `import comm`
(whose `create_comm` and `get_comm_manager` the driver's import hook then replaces with these,
as ipykernel does when it starts), or `get_ipython().kernel.comm_manager`.

A comm message the guest sends goes to iopub through the door's `publish` (its buffers in
base64, sent by the kernel as the message's binary frames), as a child of the request being
served; a frontend's comm message arrives as a request of kind `comm`, which `_comm_dispatch`
hands to the manager as ipykernel's shell handlers do. As in ipykernel, what goes wrong in a
handler (an unknown target, an exception) is written to stderr and the kernel carries on.
"""

import math


def _comm_json_default(obj):
    """What jupyter_client's message packer makes of values JSON lacks."""
    import datetime
    import numbers
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (datetime.date, datetime.time)):
        text = obj.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    try:
        return list(iter(obj))
    except TypeError:
        pass
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _comm_finite(obj):
    """`obj` with NaN and infinities as their repr, as jupyter_client's fallback cleans them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {key: _comm_finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_comm_finite(value) for value in obj]
    return obj


_comm_encoder = json.JSONEncoder(default=_comm_json_default, allow_nan=False)


def _comm_send(message):
    """Sends one comm message through the door (stdout and stderr flushed first, so the output
    before it stays before it)."""
    try:
        text = _comm_encoder.encode(message)
    except ValueError:  # NaN or an infinity somewhere
        text = _comm_encoder.encode(_comm_finite(message))
    _flush()
    answer = json.loads(_host.call(text.encode()))
    if "error" in answer:
        raise RuntimeError(f"the kernel refused a {message['msg_type']}: {answer['error']}")


def _comm_log(text, error=None):
    """What ipykernel's comm manager logs, on stderr (with the traceback of `error`)."""
    _flush()
    if error is not None:
        text += "\n" + "\n".join(_formatted(_format_traceback, error))
    print(text, file=sys.stderr, flush=True)


class Comm:
    """A comm: one end of a channel between the kernel and a frontend, named by `comm_id`, that
    carries JSON `data`, `metadata` and binary `buffers` both ways. The API of the `comm`
    package's `BaseComm` (which ipykernel's `Comm` extends): the primary end (made here)
    opens its peer at once; `send`, `close`, and the callbacks `on_msg` and `on_close`."""

    def __init__(self, target_name="comm", data=None, metadata=None, buffers=None, comm_id=None,
                 primary=True, target_module=None, topic=None, _open_data=None, _close_data=None,
                 **kwargs):
        # ipykernel's Comm took these; they mean nothing here.
        kwargs.pop("kernel", None)
        kwargs.pop("show_warning", None)
        super().__init__(**kwargs)
        self.comm_id = comm_id if comm_id else os.urandom(16).hex()
        self.primary = primary
        self.target_name = target_name
        self.target_module = target_module
        self.topic = topic if topic else f"comm-{self.comm_id}".encode("ascii")
        self._open_data = _open_data if _open_data else {}
        self._close_data = _close_data if _close_data else {}
        self._msg_callback = None
        self._close_callback = None
        self._closed = True
        if self.primary:
            self.open(data=data, metadata=metadata, buffers=buffers)
        else:
            self._closed = False

    @property
    def kernel(self):
        """The kernel object (`get_ipython().kernel`), as ipykernel's comms have."""
        return get_ipython().kernel

    def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
        """Sends a comm message (`comm_open`, `comm_msg` or `comm_close`) to the frontend, as a
        child of the request being served."""
        content = dict(keys, data={} if data is None else data, comm_id=self.comm_id)
        message = {"op": "publish", "msg_type": msg_type, "content": content,
                   "metadata": {} if metadata is None else metadata}
        if buffers:
            message["buffers"] = [base64.b64encode(memoryview(b).tobytes()).decode("ascii")
                                  for b in buffers]
        _comm_send(message)

    def __del__(self):
        try:
            self.close(deleting=True)
        except Exception:
            pass

    def open(self, data=None, metadata=None, buffers=None):
        """Opens the frontend's end of this comm."""
        if data is None:
            data = self._open_data
        manager = get_comm_manager()
        manager.register_comm(self)
        try:
            self.publish_msg("comm_open", data=data, metadata=metadata, buffers=buffers,
                             target_name=self.target_name, target_module=self.target_module)
            self._closed = False
        except Exception:
            manager.unregister_comm(self)
            raise

    def close(self, data=None, metadata=None, buffers=None, deleting=False):
        """Closes the frontend's end of this comm (once)."""
        if self._closed:
            return
        self._closed = True
        if data is None:
            data = self._close_data
        self.publish_msg("comm_close", data=data, metadata=metadata, buffers=buffers)
        if not deleting:
            get_comm_manager().unregister_comm(self)

    def send(self, data=None, metadata=None, buffers=None):
        """Sends `data` (JSON), `metadata` and binary `buffers` to the frontend's end."""
        self.publish_msg("comm_msg", data=data, metadata=metadata, buffers=buffers)

    def on_close(self, callback):
        """`callback(msg)` runs when the frontend closes the comm (None: no callback)."""
        self._close_callback = callback

    def on_msg(self, callback):
        """`callback(msg)` runs for each `comm_msg` from the frontend (None: no callback)."""
        self._msg_callback = callback

    def handle_close(self, msg):
        if self._close_callback:
            self._close_callback(msg)

    def handle_msg(self, msg):
        if self._msg_callback:
            # As the comm package: the shell's pre/post_execute callbacks run around it.
            shell = _shell["instance"]
            if shell is not None:
                shell.events.trigger("pre_execute")
            self._msg_callback(msg)
            if shell is not None:
                shell.events.trigger("post_execute")

    def __repr__(self):
        return f"<Comm {self.comm_id} target_name={self.target_name!r}>"


Comm.__module__ = "_sandgate"


class CommManager:
    """The kernel's comms by id and comm targets by name, and the handlers of the frontend's
    comm messages; the API of the `comm` package's `CommManager`."""

    def __init__(self):
        self.comms = {}
        self.targets = {}

    def register_target(self, target_name, f):
        """`f(comm, msg)` runs when the frontend opens a comm to `target_name` (`f` may be an
        import string, `"module.function"`)."""
        if isinstance(f, str):
            module, _, name = f.rpartition(".")
            f = getattr(__import__(module, fromlist=[name]), name) if module else __import__(name)
        self.targets[target_name] = f

    def unregister_target(self, target_name, f=None):
        return self.targets.pop(target_name)

    def register_comm(self, comm):
        self.comms[comm.comm_id] = comm
        return comm.comm_id

    def unregister_comm(self, comm):
        self.comms.pop(comm.comm_id)

    def get_comm(self, comm_id):
        """The comm with this id, or None (and a warning, as ipykernel logs one)."""
        try:
            return self.comms[comm_id]
        except (KeyError, TypeError):
            _comm_log(f"No such comm: {comm_id}")
            return None

    # The frontend's messages; `stream` and `ident` are ipykernel's and unused.

    def comm_open(self, stream, ident, msg):
        content = msg["content"]
        comm_id, target_name = content["comm_id"], content["target_name"]
        f = self.targets.get(target_name)
        comm = create_comm(comm_id=comm_id, primary=False, target_name=target_name)
        self.register_comm(comm)
        if f is None:
            _comm_log(f"No such comm target registered: {target_name}")
        else:
            try:
                f(comm, msg)
                return
            except Exception as e:
                _comm_log(f"Exception opening comm with target: {target_name}", e)
        try:
            comm.close()
        except Exception as e:
            _comm_log("Could not close comm during `comm_open` failure clean-up.", e)

    def comm_msg(self, stream, ident, msg):
        comm_id = msg["content"]["comm_id"]
        comm = self.get_comm(comm_id)
        if comm is None:
            return
        try:
            comm.handle_msg(msg)
        except Exception as e:
            _comm_log(f"Exception in comm_msg for {comm_id}", e)

    def comm_close(self, stream, ident, msg):
        comm_id = msg["content"]["comm_id"]
        comm = self.get_comm(comm_id)
        if comm is None:
            return
        comm._closed = True
        self.comms.pop(comm_id, None)
        try:
            comm.handle_close(msg)
        except Exception as e:
            _comm_log(f"Exception in comm_close for {comm_id}", e)


CommManager.__module__ = "_sandgate"
_comm_manager = CommManager()


def create_comm(*args, **kwargs):
    """A new comm (the `comm` package's `create_comm`, as the sandbox's kernel makes it)."""
    return Comm(*args, **kwargs)


def get_comm_manager():
    """The kernel's one comm manager (the `comm` package's `get_comm_manager`)."""
    return _comm_manager


def _comm_patch(module):
    """Makes the `comm` package's factories the sandbox's (done when it is imported)."""
    module.create_comm = create_comm
    module.get_comm_manager = get_comm_manager


def _comm_dispatch(req):
    """A frontend's comm message (a request of kind `comm`), handed to the manager."""
    header = req.get("header") if isinstance(req.get("header"), dict) else {}
    buffers = req.get("buffers") or []
    msg = {"header": header, "msg_id": header.get("msg_id"), "msg_type": header.get("msg_type"),
           "parent_header": req.get("parent_header") or {}, "metadata": req.get("metadata") or {},
           "content": req.get("content") if isinstance(req.get("content"), dict) else {},
           "buffers": [memoryview(base64.b64decode(b)) for b in buffers]}
    _state["parent"] = msg
    handler = {"comm_open": _comm_manager.comm_open, "comm_msg": _comm_manager.comm_msg,
               "comm_close": _comm_manager.comm_close}.get(msg["msg_type"])
    try:
        if handler is not None:
            handler(None, None, msg)
    except Exception as e:
        # A message without the fields its type needs.
        _comm_log(f"Malformed {msg['msg_type']} message", e)
    except BaseException as e:
        # An interrupt, or the time limit, while a handler ran: shown as a cell's would be.
        content = _error_content(e, _state["count"])
        _comm_log("\n".join(content["traceback"]))
    finally:
        _flush()
        # Figures a handler drew are shown now, as the inline backend does after a comm
        # message (its post_execute hook).
        _flush_figures()
    return {"status": "ok"}


def _comm_targets(target_name=None):
    """The open comms, `{comm_id: {"target_name": ...}}`, of one target if named."""
    return {comm_id: {"target_name": comm.target_name}
            for comm_id, comm in list(_comm_manager.comms.items())
            if target_name is None or comm.target_name == target_name}
