"""Request and response bodies. Requests forbid unknown fields: a misspelled or unsupported
parameter is a 400 that names it, never silently ignored. Every request field is bounded (numbers,
string lengths, list and object sizes), so no value can overflow torch or exhaust memory; the
prompt's length is bounded again by the configured limits in the routes."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from server.api.structured_outputs import (
    ANY_JSON_OBJECT,
    choice_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)
from server.api.tool_calls import calls_schema, parameters_schema
from server.engine.grammar import bounded
from server.engine.sampling_params import (
    MAX_BIAS,
    MAX_BIASED_TOKENS,
    MAX_LOGPROBS,
    MAX_NEW_TOKENS,
    MAX_PENALTY,
    MAX_SEED,
    MAX_TOKEN_ID,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    SamplingParams,
)
from server.tokenization import reserved_template_names

MAX_STOP_STRINGS = 16
MAX_NAME_CHARS = 256  # model ids, adapter refs, user ids
MAX_TEXT_CHARS = 1 << 24  # a hard cap on any text; the configured max_prompt_chars is far lower
MAX_PROMPT_TOKENS = 1 << 20  # token-id prompts; the context window is far lower
MAX_PROMPT_LIST = 1024  # /v1/completions prompt lists; the configured max_prompts is far lower
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 256
MAX_CHOICES = 128  # n and best_of (the route's max_prompts bounds prompts x n again)
MAX_OBJECT_KEYS = 256  # free-form objects (JSON schemas, template variables, ...)
MAX_TOOLS = 128  # a request's functions; also the calls of one message
MAX_VERSION = (1 << 31) - 1

StopString = Annotated[str, Field(min_length=1, max_length=256)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
ModelName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
FreeObject = Annotated[dict, Field(max_length=MAX_OBJECT_KEYS)]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]
LogitBias = Annotated[
    dict[Name, Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]],
    Field(max_length=MAX_BIASED_TOKENS, description="Token id (a JSON key) -> value added to its logit"),
]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs`: the output held to exactly one of these (server/engine/grammar.py)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: FreeObject | Text | None = Field(
        None, alias="json", description="A JSON schema (an object, or its JSON text) the output is an instance of"
    )
    regex: Text | None = Field(None, description="A regular expression the output matches whole")
    choice: Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPT_LIST)] | None = Field(
        None, description="The output is exactly one of these strings"
    )
    grammar: Text | None = Field(None, description="A Lark grammar (llguidance's dialect, start rule `start`)")
    json_object: bool | None = Field(None, description="true: any JSON object")
    disable_any_whitespace: bool = Field(False, description="JSON without whitespace between its tokens")

    @model_validator(mode="after")
    def _one_that_compiles(self):
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object") if self._given(name)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, regex, choice, grammar or json_object (given: {given})")
        bounded(self.grammar_text())  # compiled over the tokenizer by the route, off the event loop
        return self

    def _given(self, name: str) -> bool:
        """null is unset, and so is json_object false; an empty schema ({}: any JSON value) or regex is given."""
        if name == "json_object":
            return self.json_object is True
        return (self.json_schema if name == "json" else getattr(self, name)) is not None

    def grammar_text(self) -> str:
        """The llguidance grammar the engine holds the output to."""
        any_whitespace = not self.disable_any_whitespace
        if self.json_schema is not None:
            return json_schema_grammar(self.json_schema, any_whitespace)
        if self.regex is not None:
            return regex_grammar(self.regex)
        if self.choice is not None:
            return choice_grammar(self.choice)
        if self.grammar is not None:
            return lark_grammar(self.grammar)
        return json_schema_grammar(ANY_JSON_OBJECT, any_whitespace)


# vLLM's older fields, each one kind of structured output
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class SamplingFields(StrictModel):
    """Sampling parameters shared by every generation route (vLLM's names and meanings)."""

    temperature: float = Field(0.0, ge=0, le=100, description="0 (or below 1e-5) = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, le=MAX_TOP_K, description="0 or -1 = off")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10)
    presence_penalty: Penalty = Field(0.0, description="Subtracted from the logit of every token generated so far")
    frequency_penalty: Penalty = Field(0.0, description="Subtracted once per time a token was generated so far")
    logit_bias: LogitBias | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description="Stop strings (not in the output)"
    )
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    min_tokens: int = Field(
        0, ge=0, le=MAX_NEW_TOKENS, description="No EOS, stop token or stop string ends it before this many tokens"
    )
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string that ends it in the text")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Return each prompt token's logprob (the first's: null) with the top n"
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="Hold the output to a JSON schema, a regex, choices or a grammar (also vLLM's guided_*)"
    )

    @model_validator(mode="before")
    @classmethod
    def _guided_fields(cls, data):
        """vLLM's guided_json, guided_regex, guided_choice and guided_grammar: structured_outputs by older names."""
        if not isinstance(data, dict) or not GUIDED_FIELDS.keys() & data.keys():
            return data
        data = dict(data)
        named = {GUIDED_FIELDS[name]: data.pop(name) for name in GUIDED_FIELDS if name in data}
        guided = {kind: value for kind, value in named.items() if value is not None}  # null is unset, as in vLLM
        if not guided:
            return data
        if data.get("structured_outputs") is not None:
            raise ValueError("give structured_outputs or a guided_* field, not both")
        data["structured_outputs"] = guided
        return data

    def structure(self) -> StructuredOutputs | None:
        """What the output is held to, if anything."""
        return self.structured_outputs

    def structure_field(self) -> str:
        """The field that gave `structure()`, which its errors name."""
        return "structured_outputs"

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if not bias:
            return bias
        for key in bias:
            if not key.isascii() or not key.isdigit() or int(key) > MAX_TOKEN_ID:
                raise ValueError(f"logit_bias keys must be token ids (integers from 0 to {MAX_TOKEN_ID}), not {key!r}")
        if len({int(key) for key in bias}) != len(bias):  # "5" and "05": the values would add up
            raise ValueError("logit_bias names a token id twice")
        return bias

    def sampling(self, max_new_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple(sorted((int(token), value) for token, value in (self.logit_bias or {}).items())),
            seed=self.seed,
            stop_token_ids=tuple(self.stop_token_ids),
            stop=stop,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=structure.grammar_text() if (structure := self.structure()) is not None else None,
        )


# -- native API -------------------------------------------------------------------------------------
class GenerateRequest(SamplingFields):
    prompt: Text | None = Field(None, description="Text prompt (BOS is added as the model expects)")
    input_ids: TokenIds | None = Field(None, description="Token ids, used as given (instead of prompt)")
    adapter: Name | None = Field(None, description="Adapter name or name@version; unset = the base model")
    max_new_tokens: MaxTokens = 64
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Return logprobs with the top n")
    stream: bool = Field(False, description="Server-sent events, one per token batch")

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        if self.input_ids is not None and not self.input_ids:
            raise ValueError("input_ids must not be empty")
        return self


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float
    rank: int | None = Field(None, description="How many tokens are at least as likely, this one included")
    top_logprobs: list[dict] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AdapterRef(BaseModel):
    name: str
    version: int


class GenerateResponse(BaseModel):
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    adapter: AdapterRef | None
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


# -- OpenAI-compatible API --------------------------------------------------------------------------
class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: Name | None = None
    description: Text | None = None
    schema_: FreeObject | None = Field(None, alias="schema", description="unset: any JSON value")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(StrictModel):
    """OpenAI's `response_format`: plain text, any JSON object, or an instance of a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        if (structure := self.structure()) is not None:
            bounded(structure.grammar_text())
        return self

    def structure(self) -> StructuredOutputs | None:
        """As vLLM's structured_outputs (checked by this model's validation)."""
        if self.type == "json_object":
            return StructuredOutputs.model_construct(json_object=True)
        if self.type == "json_schema":
            schema = self.json_schema.schema_
            return StructuredOutputs.model_construct(json_schema=schema if schema is not None else {})
        return None


class OpenAIFields(SamplingFields):
    """Fields both OpenAI routes share. Accepted but unsupported values are refused in `check()`."""

    model: ModelName
    temperature: float = Field(1.0, ge=0, le=2)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _one_structure(self):
        if self.structured_outputs is not None and self._response_structure() is not None:
            raise ValueError("give response_format or structured_outputs (or guided_*), not both")
        return self

    def structure(self) -> StructuredOutputs | None:
        held = self._response_structure()
        return held if held is not None else self.structured_outputs

    def structure_field(self) -> str:
        return "response_format" if self._response_structure() is not None else super().structure_field()

    def _response_structure(self) -> StructuredOutputs | None:
        return self.response_format.structure() if self.response_format is not None else None

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """OpenAI's optional fields are nullable, and clients send null for unset: a known field that is
        null takes its default. An unknown field stays, to be refused."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or key not in cls.model_fields}
        return data

    def unsupported(self) -> str | None:
        if self.stream_options is not None and not self.stream:
            return "stream_options: only allowed with stream=true"
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs: not available with stream=true (as in vLLM)"
        return None


Prompt = (
    Text
    | Annotated[list[Text], Field(max_length=MAX_PROMPT_LIST)]
    | TokenIds
    | Annotated[list[TokenIds], Field(max_length=MAX_PROMPT_LIST)]
)


class CompletionRequest(OpenAIFields):
    prompt: Prompt
    max_tokens: int = Field(16, ge=0, le=MAX_NEW_TOKENS, description="0, with echo: the prompt alone")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Name | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    def unsupported(self) -> str | None:
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens: 0 is for echo only (the prompt alone, with logprobs its tokens' scores)"
        if self.suffix:
            return "suffix is not supported"
        if self.best_of not in (None, self.n):
            return "best_of: only best_of = n is supported (no choosing among extra samples)"
        return super().unsupported()

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        """No prompt at all; an empty text is a prompt (BOS alone), as in a list and on /v1/generate."""
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    def prompt_scores(self) -> int | None:
        """The alternatives each prompt token is scored with, if it is: an echoed prompt's logprobs are its
        tokens' scores, which vLLM's prompt_logprobs report too."""
        wanted = [n for n in (self.logprobs if self.echo else None, self.prompt_logprobs) if n is not None]
        return max(wanted, default=None)

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [prompt]
        return list(prompt)


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class FunctionCall(StrictModel):
    name: FunctionName
    arguments: Text = Field(description="The arguments, the JSON text of an object (OpenAI's)")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            parsed = json.loads(arguments) if arguments else {}
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("not the JSON text of an object")
        return arguments

    def for_template(self) -> dict:
        """The arguments an object, as chat templates take them (transformers' tool use; vLLM passes them so)."""
        return {"name": self.name, "arguments": json.loads(self.arguments) if self.arguments else {}}


class ToolCall(StrictModel):
    """A call an earlier assistant message made, as OpenAI's responses give it."""

    id: Name | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict:
        call = {"type": self.type, "function": self.function.for_template()}
        return call if self.id is None else {"id": self.id, **call}


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = Field(
        None, description="Null or absent only on an assistant message that makes tool_calls"
    )
    name: Name | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="An assistant message's calls (OpenAI's shape)"
    )
    tool_call_id: Name | None = Field(None, description="A tool message's: the call it answers")

    @model_validator(mode="after")
    def _fields_of_its_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only on an assistant message")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only on a tool message")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: needed, except on an assistant message that makes tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """As chat templates take a message (vLLM's shape): a call's arguments an object; a tool message's name (the
        function's, which some templates show) and tool_call_id; no content is the empty text."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.role == "tool":
            message |= {key: value for key in ("name", "tool_call_id") if (value := getattr(self, key)) is not None}
        return message

    def chars(self) -> int:
        """The characters it brings to the prompt: its text and its calls."""
        calls = sum(len(c.function.name) + len(c.function.arguments) for c in self.tool_calls or ())
        return len(self.text()) + calls


class FunctionDefinition(StrictModel):
    name: FunctionName
    description: Text | None = None
    parameters: FreeObject | None = Field(
        None, description="The JSON schema of its arguments, an object; unset: it takes none"
    )
    strict: bool | None = Field(None, description="Accepted, as OpenAI's; a forced call always follows the schema")

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, parameters: dict | None) -> dict | None:
        """A call's arguments are a JSON object (OpenAI's): a schema of anything else describes no call."""
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ValueError(f'the arguments are an object: a schema of "type": {parameters["type"]!r} describes none')
        return parameters


class Tool(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition

    def for_template(self) -> dict:
        function = self.function
        described = {} if function.description is None else {"description": function.description}
        schema = {"name": function.name, **described, "parameters": parameters_schema(function.parameters)}
        return {"type": self.type, "function": schema}


class NamedFunction(StrictModel):
    name: FunctionName


class NamedToolChoice(StrictModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatTemplateFields(StrictModel):
    """How the chat template renders a chat (vLLM's fields, alike on the chat route and /tokenize)."""

    add_generation_prompt: bool = Field(True, description="End with the header of the assistant's reply to come")
    continue_final_message: bool = Field(
        False, description="Leave the last message open, for the model to go on with it (add_generation_prompt=false)"
    )
    chat_template_kwargs: FreeObject | None = Field(
        None, description="More variables for the chat template (e.g. enable_thinking, where a template reads it)"
    )
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="Functions the model may call, shown to it by the chat template (where it renders tools)"
    )

    @model_validator(mode="after")
    def _one_ending(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError(
                "continue_final_message=true needs add_generation_prompt=false: "
                "a chat ends either with its last message open or with a new reply's header"
            )
        return self

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, kwargs: dict | None) -> dict | None:
        """Not the rendering's own arguments (tokenize, return_dict, ...) nor the messages: variables alone."""
        if taken := sorted(set(kwargs or ()) & reserved_template_names()):
            raise ValueError(f"{', '.join(taken)}: set by the server, not a template variable a request may give")
        return kwargs

    @field_validator("tools")
    @classmethod
    def _one_function_a_name(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or ()]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"{', '.join(twice)}: more than one function of that name")
        return tools

    def template_kwargs(self) -> dict:
        return self.chat_template_kwargs or {}

    def template_tools(self) -> list[dict] | None:
        """The tools as chat templates take them; none (not an empty list) where there are none."""
        return [tool.for_template() for tool in self.tools] if self.tools else None


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(OpenAIFields, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    parallel_tool_calls: bool = Field(
        True, description='false: one call at most ("required" makes one, "auto" answers only the first)'
    )
    tool_choice: ToolChoice | None = Field(
        None,
        description='"none": text; "required": calls of the tools; {"type": "function", "function": {"name"}}: a call '
        'of that function; "auto" (the default with tools): text or calls, as the model writes them, read by the '
        "server's --tool-call-parser (without one, a 400)",
    )

    @field_validator("tool_choice")
    @classmethod
    def _a_choice_among_the_tools(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        """Checked against the fields before it, where they are valid (else their own errors tell)."""
        if choice in (None, "none") or "tools" not in info.data:
            return choice
        tools = info.data["tools"]
        if tools is None:
            raise ValueError("needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"the function {choice.function.name!r} is not one of the tools")
        if (schema := forced_schema(choice, tools, info.data.get("parallel_tool_calls", True))) is None:
            return choice
        response_format = info.data.get("response_format")
        if info.data.get("structured_outputs") is not None or (
            response_format and response_format.structure() is not None
        ):
            raise ValueError("the calls' schema holds the output: not with response_format or structured_outputs")
        bounded(StructuredOutputs.model_construct(json_schema=schema).grammar_text())
        return choice

    def unsupported(self) -> str | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs: needs logprobs=true"
        return super().unsupported()

    def tool_mode(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        """What tool_choice means here: unset, "auto" where there are tools; "required" of no tools, "none" (OpenAI's,
        as vLLM's)."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return "none" if self.tool_choice == "required" and not self.tools else self.tool_choice

    def forces_calls(self) -> bool:
        return self.tool_mode() not in ("none", "auto")

    def named_function(self) -> str | None:
        mode = self.tool_mode()
        return mode.function.name if isinstance(mode, NamedToolChoice) else None

    def structure(self) -> StructuredOutputs | None:
        if self.forces_calls():
            schema = forced_schema(self.tool_mode(), self.tools, self.parallel_tool_calls)
            return StructuredOutputs.model_construct(json_schema=schema)
        return super().structure()

    def structure_field(self) -> str:
        if (named := self.named_function()) is not None:
            return f"tools.{[t.function.name for t in self.tools].index(named)}.function.parameters"
        return "tools" if self.forces_calls() else super().structure_field()

    def max_new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def forced_schema(choice: ToolChoice, tools: list[Tool], parallel: bool) -> dict | None:
    """The JSON schema of the calls a tool_choice forces, if it does."""
    if isinstance(choice, NamedToolChoice):
        (function,) = [t.function for t in tools if t.function.name == choice.function.name]
        return parameters_schema(function.parameters)
    if choice == "required" and tools:
        return calls_schema([(t.function.name, t.function.parameters) for t in tools], parallel)
    return None


# -- tokenization (vLLM's) --------------------------------------------------------------------------
CHAT_ONLY_FIELDS = frozenset(
    {
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "chat_template_kwargs",
        "mm_processor_kwargs",
        "tools",
    }
)


class TokenizeRequest(ChatTemplateFields):
    """vLLM's two forms in one: `prompt` (TokenizeCompletionRequest) or `messages` (TokenizeChatRequest)."""

    model: ModelName | None = Field(
        None, description="The base model or an adapter (404 if neither): every adapter tokenizes as the base model"
    )
    prompt: Text | None = Field(None, description="A text prompt, tokenized as generation tokenizes it (BOS added)")
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = Field(
        None, description="A chat, rendered with the chat template as the chat route renders it"
    )
    add_special_tokens: bool | None = Field(
        None,
        description="Add the special tokens a raw prompt gets (BOS); unset: yes for a prompt, as generation does, "
        "no for a chat, whose template has its own",
    )
    return_token_strs: bool | None = Field(False, description="Also return each token's vocabulary string")
    # vLLM's, for what this server does not do: accepted unset or empty, as clients send them, else refused
    chat_template: Text | None = None
    mm_processor_kwargs: FreeObject | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and (chat_only := sorted(CHAT_ONLY_FIELDS & self.model_fields_set)):
            raise ValueError(f"{', '.join(chat_only)}: only with messages")
        return self

    def unsupported(self) -> str | None:
        if self.chat_template is not None:
            return "chat_template: not supported (chats render with the model's own template, as on the chat route)"
        if self.mm_processor_kwargs:
            return "mm_processor_kwargs: not supported (text-only models)"
        return None

    def with_special_tokens(self) -> bool:
        """vLLM's defaults: a prompt gets them, as generation adds them; a chat's template has its own."""
        return self.prompt is not None if self.add_special_tokens is None else self.add_special_tokens


class DetokenizeRequest(StrictModel):
    model: ModelName | None = Field(None, description="The base model or an adapter (404 if neither)")
    tokens: TokenIds


# -- admin API --------------------------------------------------------------------------------------
class SetCurrentRequest(StrictModel):
    version: int = Field(ge=1, le=MAX_VERSION)


class VersionSummary(BaseModel):
    version: int
    size: int
    created: float
    type: str | None = None
    layers: list[int] | None = None
    rank: int | None = None
    positions: str | None = None
    share_weights: bool | None = None
    loaded: bool = False
    base_model: str | None = None
    base_model_fingerprint: str | None = None
    fingerprint_status: Literal["verified", "unverified", "foreign"] | None = None
    provenance: dict | None = Field(None, description="How it was made: data, training arguments, losses, time")


class AdapterSummary(BaseModel):
    name: str
    current_version: int
    versions: list[int]
    size: int
    type: str | None
    layers: list[int] | None
    rank: int | None
    positions: str | None
    loaded: bool
    fingerprint_status: Literal["verified", "unverified", "foreign"] | None = None


class ResidentAdapter(BaseModel):
    name: str
    version: int
    bytes: int
    loads: int = Field(description="Times loaded from the store by this replica (reloads after eviction count)")
    last_used: float = Field(description="Unix time of the last request that used it")
    in_use: int = Field(description="Requests holding it now")


class AdapterDetail(AdapterSummary):
    details: list[VersionSummary]


class PublishResponse(BaseModel):
    name: str
    version: int
    size: int
    type: str
    layers: list[int]
    rank: int
